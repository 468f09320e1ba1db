"""Tiny LightningModules written the way users write them, for parity tests.

Nothing here is adapted to a parallel library: parameters sit bare on the LightningModule,
norms are hand-written, stages are torchvision-style attributes, skip connections are kept in a
Python list, and some parameters are used only by the loss. Each is named by import path in a
parity spec ("tests.user_models:LlamaStyle") with the data factory it trains on:

    LlamaStyle    tests.user_models:token_data        (tests.models:token_data)
    ViTStyle      tests.user_models:image_data        (size=8)
    LearnedNoise  tests.user_models:regression_data   (tests.models:regression_data)
    ResNetStyle   tests.user_models:image_data        (size=32)
    UNetStyle     tests.user_models:denoise_data
    GAN           tests.user_models:gan_data          (manual optimization, two optimizers)

Conventions the parity harness relies on: every step logs "train_loss" and "val_loss" with
sync_dist=True, training and validation steps call the model through self(...), and
configure_optimizers returns AdamW over self.parameters(). No dropout or BatchNorm (micro-batches
would change them), and no parameter whose gradient is mathematically zero (a bias on a key
projection: AdamW would normalise its rounding noise into full-size steps). ResNetStyle and
UNetStyle use SiLU and one-channel-per-group GroupNorm, and ResNetStyle AdamW's eps=1e-6: the
measurements behind each are in the comments there.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tests.models import regression_data, token_data  # noqa: F401  (re-exported as data factories)


# ---------------------------------------------------------------------------- data


def image_data(n_train=64, n_val=16, size=8, channels=3, classes=10, seed=2024):
    """Random images labelled by a fixed random linear projection (so the labels are learnable)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(channels * size * size, classes, generator=gen)

    def split(n):
        x = torch.randn(n, channels, size, size, generator=gen)
        return TensorDataset(x, (x.flatten(1) @ w).argmax(1))

    return split(n_train), split(n_val)


def denoise_data(n_train=64, n_val=16, size=32, channels=3, seed=2025):
    """Random images whose target is a fixed smooth function of them: a 3x3 box blur, squashed."""
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(n, channels, size, size, generator=gen)
        return TensorDataset(x, torch.tanh(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)))

    return split(n_train), split(n_val)


# ---------------------------------------------------------------------------- LlamaStyle


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        n_local_heads = q.shape[-1] // self.head_dim  # from the width, as examples/gpt.py does
        q, k, v = (t.view(B, T, n_local_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, n_local_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model, multiple_of=16):
        super().__init__()
        hidden = int(2 * 4 * d_model / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.attention_norm = RMSNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads)
        self.ffn_norm = RMSNorm(d_model)
        self.feed_forward = SwiGLU(d_model)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class LlamaStyle(pl.LightningModule):
    """A Llama-like decoder from a blog post: hand-written RMSNorm, SwiGLU, and the learned
    position table as a bare nn.Parameter on the LightningModule itself (not in a submodule)."""

    def __init__(self, n_layers=4, d_model=32, vocab=64, seq_len=16, n_heads=4, lr=1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.blocks = nn.ModuleList([LlamaBlock(d_model, n_heads) for _ in range(n_layers)])
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        logits = self(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        idx, targets = batch
        logits = self(idx)
        self.log("val_loss", F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# ---------------------------------------------------------------------------- ViTStyle


class ViTAttention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # timm's qkv_bias=False (a key bias gets no gradient)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ViTBlock(nn.Module):
    def __init__(self, dim, n_heads, mlp_ratio=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTStyle(pl.LightningModule):
    """A ViT classifier as in the tutorials: conv patch embedding, and the class token and
    position embedding as bare nn.Parameters on the LightningModule."""

    def __init__(self, image_size=8, patch=2, channels=3, classes=10, dim=32, depth=4, n_heads=4, lr=1e-3):
        super().__init__()
        self.save_hyperparameters()
        n_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, dim))
        self.blocks = nn.ModuleList([ViTBlock(dim, n_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # B, N, dim
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])

    def training_step(self, batch, batch_idx):
        img, label = batch
        loss = F.cross_entropy(self(img), label)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        img, label = batch
        self.log("val_loss", F.cross_entropy(self(img), label), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# ---------------------------------------------------------------------------- LearnedNoise


class LearnedScale(nn.Module):
    """A loss module with its own parameter: squared error of the rescaled prediction."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pred, target):
        return F.mse_loss(self.scale * pred, target)


class LearnedNoise(pl.LightningModule):
    """A heteroscedastic-regression user: the forward is a plain MLP, but two parameters are
    touched only by the loss in training_step/validation_step (a learned noise level in a
    Gaussian NLL and a loss module holding a learned scale)."""

    def __init__(self, d_in=12, hidden=32, d_out=4, depth=4, lr=1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.inp = nn.Linear(d_in, hidden)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(depth)])
        self.out = nn.Linear(hidden, d_out)
        self.log_sigma = nn.Parameter(torch.zeros(d_out))
        self.criterion = LearnedScale()

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        nll = F.gaussian_nll_loss(pred, y, self.log_sigma.exp().pow(2).expand_as(pred))
        loss = nll + 0.5 * self.criterion(pred, y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        nll = F.gaussian_nll_loss(pred, y, self.log_sigma.exp().pow(2).expand_as(pred))
        self.log("val_loss", nll + 0.5 * self.criterion(pred, y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# ---------------------------------------------------------------------------- ResNetStyle and UNetStyle
#
# Two changes from the textbook versions, both measured (6-8 AdamW steps, lr 1e-3, one batch of
# 8 against the same batch as 4 micro-batches of 2, which is what pipeline parallelism computes):
#
# * SiLU, not ReLU, by default (`activation="relu"` restores it). A ReLU makes the gradient jump
#   when float rounding moves a pre-activation across zero, AdamW turns those jumps into
#   lr-sized steps, and the runs drift apart: ResNetStyle's parameters with ReLUs differed by
#   up to 4e-4 after one step and by 1e-3..7e-3 after eight for each of 4 seeds; with SiLU the
#   gap stays where step one left it. UNetStyle's with ReLUs stayed under 1e-4 but grew (to
#   5e-5 by step 8).
# * GroupNorm with one channel per group, per sample (micro-batches can't change it) and per
#   channel like the BatchNorm it replaces. With 8 groups, whole channels of the 4x4 last stage
#   went dead under the ReLUs for about half the seeds tried, and the SiLU version's parameters
#   differed by 2e-4 for seed 0. Convolutions that feed a norm have no bias (its gradient would
#   be zero).


def _norm(channels):
    return nn.GroupNorm(channels, channels)


def _activation(name):
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"activation must be 'silu' or 'relu', not {name!r}")


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, activation="silu"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.gn1 = _norm(planes)
        self.act = _activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.gn2 = _norm(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), _norm(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.act(out + identity)


class ResNetStyle(pl.LightningModule):
    """A narrow CIFAR-sized ResNet-18 written torchvision's way (GroupNorm for BatchNorm): a
    stem, four stages of two BasicBlocks (widths 16, 32, 64, 128; each stage after the first
    halves the resolution, so all four cost about the same), global average pooling and a linear
    head. The stages are one nn.Sequential (`stages_as="sequential"`: `self.stages`) or
    torchvision's attributes `self.layer1 .. self.layer4` (`stages_as="attributes"`).

    AdamW's eps is 1e-6 (RoBERTa's), not 1e-8: an element whose gradient is within float noise
    (~3e-8 here) of zero gets a step of lr * noise / eps from the noise alone, and among this
    model's 700k elements a few always are; with eps=1e-8 one step of the micro-batched run
    differed by up to 1e-4 (the parity tolerance) over 12 seeds, with 1e-6 by at most 1e-5."""

    def __init__(self, widths=(16, 32, 64, 128), blocks_per_stage=2, classes=10, channels=3,
                 stages_as="sequential", activation="silu", lr=1e-3, eps=1e-6):
        super().__init__()
        if stages_as not in ("sequential", "attributes"):
            raise ValueError(f"stages_as must be 'sequential' or 'attributes', not {stages_as!r}")
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        self.gn1 = _norm(widths[0])
        self.act = _activation(activation)
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(inplanes, planes, stride, activation)]
            layers += [BasicBlock(planes, planes, 1, activation) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*layers))
            inplanes = planes
        if stages_as == "sequential":
            self.stages = nn.Sequential(*stages)
        else:
            for i, stage in enumerate(stages, 1):
                setattr(self, f"layer{i}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = self.act(self.gn1(self.conv1(x)))
        if self.hparams.stages_as == "sequential":
            x = self.stages(x)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, eps=self.hparams.eps)


class Down(nn.Module):
    def __init__(self, cin, cout, activation="silu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = _norm(cout)
        self.act = _activation(activation)

    def forward(self, x):
        skip = self.act(self.norm(self.conv(x)))
        return F.avg_pool2d(skip, 2), skip


class Up(nn.Module):
    def __init__(self, cin, cskip, cout, activation="silu"):
        super().__init__()
        self.conv = nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False)
        self.norm = _norm(cout)
        self.act = _activation(activation)

    def forward(self, x, skip):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.act(self.norm(self.conv(torch.cat([x, skip], 1))))


class UNetStyle(pl.LightningModule):
    """A small denoising U-Net: the forward keeps the encoder's skips in a Python list and the
    decoder pops them, so activations cross from early layers to late ones. (Its blocks are
    conv-norm-activation: with plain conv + ReLU and PyTorch's default init the activations
    shrink with depth, the biases win, and a third of the middle block's channels start dead.)"""

    def __init__(self, channels=3, widths=(8, 16, 32), activation="silu", lr=1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(Down(cin, w, activation))
            cin = w
        self.mid = nn.Sequential(nn.Conv2d(cin, 2 * cin, 3, padding=1, bias=False), _norm(2 * cin), _activation(activation))
        cin = 2 * cin
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(Up(cin, w, w, activation))
            cin = w
        self.out = nn.Conv2d(cin, channels, 1)

    def forward(self, x):
        skips = []
        for down in self.down:
            x, skip = down(x)
            skips.append(skip)
        x = self.mid(x)
        for up in self.up:
            x = up(x, skips.pop())
        return self.out(x)

    def training_step(self, batch, batch_idx):
        x, target = batch
        loss = F.mse_loss(self(x), target)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, target = batch
        self.log("val_loss", F.mse_loss(self(x), target), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# ---------------------------------------------------------------------------- GAN (manual optimization)


def gan_data(n_train=64, n_val=16, d=8, latent=8, seed=2026):
    """Real samples (a fixed smooth map of Gaussian noise) paired with the generator's latent
    noise. The noise comes with the sample, where a user would draw it with torch.randn in the
    step: a data-parallel rank must draw the same noise for a sample as one process does."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=gen) / d**0.5

    def split(n):
        real = torch.tanh(torch.randn(n, d, generator=gen) @ w + 0.5)
        return TensorDataset(real, torch.randn(n, latent, generator=gen))

    return split(n_train), split(n_val)


class Generator(nn.Module):
    def __init__(self, latent, hidden, d):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                   nn.LeakyReLU(0.2), nn.Linear(hidden, d), nn.Tanh())

    def forward(self, z):
        return self.model(z)


class Discriminator(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.model(x)


class GAN(pl.LightningModule):
    """A GAN as Lightning's manual-optimization docs write one: `automatic_optimization = False`,
    a generator and a discriminator optimizer, toggle_optimizer, manual_backward, opt.step(),
    opt.zero_grad(). Two parameters sit bare on the LightningModule: the latent noise's learned
    scale (read in forward) and a temperature only the discriminator's loss uses. `clip` clips each
    optimizer's gradients by norm inside the step; `accumulate` steps every that many batches;
    `optimizer="sgd"` trains with SGD, whose steps, unlike Adam's, follow the gradients' scale."""

    def __init__(self, latent=8, d=8, hidden=32, lr=2e-3, clip=None, accumulate=1, optimizer="adam"):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent, hidden, d)
        self.discriminator = Discriminator(d, hidden)
        self.noise_scale = nn.Parameter(torch.ones(latent))
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, z):
        return self.generator(z * self.noise_scale)

    def _logits(self, x):
        return self.discriminator(x) / self.temperature

    def _d_loss(self, real, fake):
        real_loss = F.binary_cross_entropy_with_logits(self._logits(real), torch.ones(len(real), 1, device=real.device))
        fake_loss = F.binary_cross_entropy_with_logits(self._logits(fake), torch.zeros(len(fake), 1, device=fake.device))
        return (real_loss + fake_loss) / 2

    def _g_loss(self, z):
        return F.binary_cross_entropy_with_logits(self._logits(self(z)), torch.ones(len(z), 1, device=z.device))

    def _update(self, opt, loss, batch_idx):
        self.manual_backward(loss / self.hparams.accumulate)
        if (batch_idx + 1) % self.hparams.accumulate == 0:
            if self.hparams.clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()

    def training_step(self, batch, batch_idx):
        real, z = batch
        g_opt, d_opt = self.optimizers()

        self.toggle_optimizer(d_opt)
        d_loss = self._d_loss(real, self(z).detach())
        self._update(d_opt, d_loss, batch_idx)
        self.untoggle_optimizer(d_opt)

        self.toggle_optimizer(g_opt)
        g_loss = self._g_loss(z)
        self._update(g_opt, g_loss, batch_idx)
        self.untoggle_optimizer(g_opt)

        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, sync_dist=True)
        self.log("train_loss", d_loss + g_loss, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        real, z = batch
        self.log("val_loss", self._d_loss(real, self(z)) + self._g_loss(z), sync_dist=True)

    def configure_optimizers(self):
        def make(params):
            if self.hparams.optimizer == "sgd":
                return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
            return torch.optim.AdamW(params, lr=self.hparams.lr, betas=(0.5, 0.999))

        return make([*self.generator.parameters(), self.noise_scale]), make([*self.discriminator.parameters(), self.temperature])


MODELS = {  # name: (model factory, data factory, data kwargs), for tests and specs
    "LlamaStyle": ("tests.user_models:LlamaStyle", "tests.user_models:token_data", {}),
    "ViTStyle": ("tests.user_models:ViTStyle", "tests.user_models:image_data", {"size": 8}),
    "LearnedNoise": ("tests.user_models:LearnedNoise", "tests.user_models:regression_data", {}),
    "ResNetStyle": ("tests.user_models:ResNetStyle", "tests.user_models:image_data", {"size": 32}),
    "UNetStyle": ("tests.user_models:UNetStyle", "tests.user_models:denoise_data", {}),
}
