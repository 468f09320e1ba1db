"""`lightning-parallel consolidate CKPT_DIR OUT_FILE`: a sharded checkpoint as one file."""

import argparse

from lightning_parallel.checkpoint import consolidate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-parallel")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("consolidate", help="write a sharded checkpoint directory as one Lightning checkpoint file")
    merge.add_argument("checkpoint_dir")
    merge.add_argument("output_file")
    args = parser.parse_args(argv)
    consolidate(args.checkpoint_dir, args.output_file)
    print(f"wrote {args.output_file}")


if __name__ == "__main__":
    main()
