"""A compact PyTorch baseline of the reference's computation, for benchmarks.

Written from ../shared/SPEC.md (sections 2, 3, 5, 6, 7), not copied: the
spectral teacher (FEN), the spatial student, the feature restoration net,
the stage-2 losses and both RX forms of the reference. Module and attribute
names follow the reference's state-dict keys, so the published .pt files and
the golden random student / FRN load with `load_state_dict(strict=True)`.

`check_against_golden()` runs everything against
../shared/reference/golden and reports the max errors; the benchmarks call
it first, so the baseline they time is known to compute what the reference
computes.

This module is for benchmarks only: fers_jax itself never imports torch.
Layout NCHW throughout, as the reference.
"""

import functools
import os
import pathlib
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FERS_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
CHECKPOINTS = SHARED / "reference" / "checkpoints" / "saved_models"

PAD = 4  # ConvH reflect padding, cropped off after the encoder


# --- Building blocks --------------------------------------------------------

def conv1x1(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (stride on the 3x3 conv), expansion 4."""

    def __init__(self, cin, width, cout, stride=1):
        super().__init__()
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv1x1(cin, cout, stride),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class BasicBlock(nn.Module):
    """torchvision BasicBlock (ResNet-18/34)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv1x1(cin, cout, stride),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class SqueezeExcitation(nn.Module):
    """Global mean, 1x1 C -> C//r, ReLU, 1x1 -> C, sigmoid, multiply.

    Keys `fc.0`, `fc.2` as the reference.
    """

    def __init__(self, channels, reduction=8):
        super().__init__()
        self.fc = nn.Sequential(conv1x1(channels, channels // reduction),
                                nn.ReLU(inplace=True),
                                conv1x1(channels // reduction, channels),
                                nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean(dim=(2, 3), keepdim=True))


# --- Spectral teacher (SPEC 2) ----------------------------------------------

class ConvH(nn.Module):
    """Reflect pad by 4, then a bias-free 1x1 conv B -> 64 (key `convh`)."""

    def __init__(self, bands, width=64):
        super().__init__()
        self.convh = conv1x1(bands, width)

    def forward(self, x):
        return self.convh(F.pad(x, (PAD,) * 4, mode="reflect"))


class Encoder(nn.Module):
    """Wide-ResNet-101-2 layer1: 3 bottlenecks, width 128, 64 -> 256."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(Bottleneck(64, 128, 256),
                                    Bottleneck(256, 128, 256),
                                    Bottleneck(256, 128, 256))

    def forward(self, x):
        return self.layer1(x)


class PixelHead(nn.Module):
    """The reference's Pixel_Classifier: conv1, conv2 used at inference;
    conv3 (B -> 1) is only in the stage-1 training form but is in pc.pt."""

    def __init__(self, bands, features=256):
        super().__init__()
        hidden = 256 if bands > 128 else 128
        self.conv1 = conv1x1(features, hidden, bias=True)
        self.conv2 = conv1x1(hidden, bands, bias=True)
        self.conv3 = conv1x1(bands, 1, bias=True)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class SpectralTeacher(nn.Module):
    """x (N, B, H, W) -> spe_f (N, B, H, W)."""

    def __init__(self, bands):
        super().__init__()
        self.convh = ConvH(bands)
        self.enc = Encoder()
        self.pc = PixelHead(bands)

    def forward(self, x):
        a = self.enc(self.convh(x))
        return self.pc(a[:, :, PAD:-PAD, PAD:-PAD])


# --- Spatial student (SPEC 3) -----------------------------------------------

class Conv2RGB(nn.Module):
    def __init__(self, bands, width=256):
        super().__init__()
        self.conv = conv1x1(bands, width, bias=True)
        self.hidden = conv1x1(width, 3, bias=True)

    def forward(self, x):
        return torch.sigmoid(self.hidden(F.relu(self.conv(x))))


def resnet34_features():
    """ResNet-34 stem and stages 1-3; indices 0, 1, 4, 5, 6 hold weights."""
    def stage(cin, cout, blocks, stride):
        return nn.Sequential(BasicBlock(cin, cout, stride),
                             *[BasicBlock(cout, cout) for _ in range(blocks - 1)])
    return nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                         nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1),
                         stage(64, 64, 3, 1), stage(64, 128, 4, 2),
                         stage(128, 256, 6, 2))


class LightSPP(nn.Module):
    """Pool to 1, 2, 4; bilinear back to (H, W); 1x1 fuse; SE."""

    def __init__(self, bands, cin=256, width=128, levels=(1, 2, 4)):
        super().__init__()
        self.levels = levels
        self.fuse = nn.Sequential(conv1x1(cin * len(levels), width),
                                  nn.ReLU(inplace=True),
                                  conv1x1(width, bands), nn.ReLU(inplace=True))
        self.se = SqueezeExcitation(bands)

    def forward(self, f, size):
        pyramid = [F.interpolate(F.adaptive_avg_pool2d(f, s), size=size,
                                 mode="bilinear", align_corners=False)
                   for s in self.levels]
        return self.se(self.fuse(torch.cat(pyramid, dim=1)))


class SpatialStudent(nn.Module):
    """x (N, B, H, W) -> (spa_f (N, B, H, W), false_rgb (N, 3, H, W))."""

    def __init__(self, bands):
        super().__init__()
        self.initial_conv = Conv2RGB(bands)
        self.get_features = resnet34_features()
        self.spp = LightSPP(bands)

    def forward(self, x):
        rgb = self.initial_conv(x)
        return self.spp(self.get_features(rgb), x.shape[-2:]), rgb

    def trainable_parameters(self):
        """Conv2RGB and LightSPP; the ResNet trunk stays frozen (SPEC 5)."""
        return [*self.initial_conv.parameters(), *self.spp.parameters()]


# --- Feature restoration net (SPEC 3.4) -------------------------------------

class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


class FeatureRestorationNet(nn.Module):
    def __init__(self, bands, blocks=3):
        super().__init__()
        layers = []
        for _ in range(blocks):
            layers += [ResidualBlock(bands), SqueezeExcitation(bands)]
        self.body = nn.Sequential(*layers)
        self.final_conv = conv1x1(bands, bands, bias=True)

    def forward(self, x):
        return self.final_conv(self.body(x))


def spec_init_(module: nn.Module, seed: int = 0):
    """SPEC 3.4 initialisation of Conv2RGB, LightSPP or the FRN, in place:
    conv weights U(-0.1, 0.1), biases U(+-1/sqrt(fan_in)), BN 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.2 - 0.1)
                if m.bias is not None:
                    bound = 1 / np.sqrt(m.weight[0].numel())
                    m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1)
                                 * bound)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1)
                m.bias.fill_(0)
    return module


# --- Loading ----------------------------------------------------------------

def _state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def load_teacher(folder, bands: int) -> SpectralTeacher:
    """The published convh.pt / enc.pt / pc.pt, strictly, in eval mode."""
    folder = pathlib.Path(folder)
    model = SpectralTeacher(bands)
    for name in ("convh", "enc", "pc"):
        getattr(model, name).load_state_dict(_state_dict(folder / f"{name}.pt"),
                                             strict=True)
    return model.eval().requires_grad_(False)


def load_student(path, bands: int) -> SpatialStudent:
    model = SpatialStudent(bands)
    model.load_state_dict(_state_dict(path), strict=True)
    return model.eval()


def load_frn(path, bands: int) -> FeatureRestorationNet:
    model = FeatureRestorationNet(bands)
    model.load_state_dict(_state_dict(path), strict=True)
    return model.eval()


# --- Stage-2 losses (SPEC 5) ------------------------------------------------

def cross_covariance(a, b):
    """Sum of squared cross-covariances of channel-standardised maps."""
    def standardise(t):
        t = t.transpose(0, 1).reshape(t.shape[1], -1)  # (C, N*H*W)
        return (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-6)
    sa, sb = standardise(a), standardise(b)
    return ((sa @ sb.T) / sa.shape[1]).pow(2).sum()


def cosine(spe_f, spa_f):
    return 1 + F.cosine_similarity(spe_f, spa_f, dim=1, eps=1e-8).mean()


def variance_preserving(spa_f):
    var = spa_f.flatten(2).var(dim=2, unbiased=True).mean(0)
    return F.relu(1 - var).mean() + spa_f.abs().mean()


@functools.lru_cache(maxsize=None)
def _gaussian_2d(size=5, sigma=1.5):
    t = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def _filter(x, kernel):
    """Depthwise 'same' filter with reflect borders (kornia filter2d)."""
    k = kernel.shape[-1]
    c = x.shape[1]
    xp = F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="reflect")
    return F.conv2d(xp, kernel.expand(c, 1, k, k), groups=c)


def ssim_loss(a, b, window=5, max_val=1.0):
    """kornia SSIMLoss(window): mean(clamp((1 - ssim) / 2, 0, 1))."""
    kernel = _gaussian_2d(window).to(a.dtype)
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu_a, mu_b = _filter(a, kernel), _filter(b, kernel)
    var_a = _filter(a * a, kernel) - mu_a ** 2
    var_b = _filter(b * b, kernel) - mu_b ** 2
    cov = _filter(a * b, kernel) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return torch.clamp((1 - num / (den + 1e-12)) / 2, 0, 1).mean()


def stage2_loss(spe_f, spa_f, rec, x):
    """Returns (total, dict of the unweighted terms)."""
    terms = {"cc": cross_covariance(spe_f, spa_f), "cos": cosine(spe_f, spa_f),
             "var": variance_preserving(spa_f), "mse": F.mse_loss(rec, x),
             "ssim": ssim_loss(rec, x)}
    weights = {"cc": 1.0, "cos": 0.1, "var": 0.1, "mse": 1.0, "ssim": 0.01}
    return sum(weights[k] * v for k, v in terms.items()), terms


class Stage2Step:
    """The reference's stage-2 training step (SPEC 5), eager PyTorch.

    Teacher frozen in eval mode under no_grad; student in train mode (its
    frozen trunk's BatchNorm uses batch statistics, or with
    trunk_bn='running' its running statistics); FRN in train mode; Adam
    (lr 0.005, betas (0.5, 0.999)) on Conv2RGB, LightSPP and the FRN.
    """

    def __init__(self, teacher, student, frn, lr=0.005, betas=(0.5, 0.999),
                 trunk_bn="batch"):
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train()
        self.student.get_features.requires_grad_(False)
        if trunk_bn == "running":  # fers_jax's --trunk-bn running
            self.student.get_features.eval()
        self.frn = frn.train()
        self.params = [*student.trainable_parameters(), *frn.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=betas)

    def __call__(self, x) -> Dict[str, float]:
        with torch.no_grad():
            spe_f = self.teacher(x)
        spa_f, _ = self.student(x)
        rec = self.frn(spa_f + spe_f)
        total, terms = stage2_loss(spe_f, spa_f, rec, x)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}


# --- Stage 1, FERD reverse distillation (SPEC 4) ------------------------------

class DeBottleneck(nn.Module):
    """RD4AD's decoder block with stride 2: the 3x3 conv is a 2x2 stride-2
    transposed conv, the shortcut a 2x2 stride-2 transposed conv + BN."""

    def __init__(self, cin, width, cout):
        super().__init__()
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False),
            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.upsample(x))


def _stage(cin, planes, blocks, stride, expansion, wpg, first=Bottleneck):
    width, cout = planes * wpg // 64, planes * expansion
    layers = [first(cin, width, cout, stride) if first is Bottleneck
              else first(cin, width, cout)]
    layers += [Bottleneck(cout, width, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stage1Encoder(nn.Module):
    """Wide-ResNet-101-2 stages 1-3 without the stem (it runs on ConvH(x))."""

    def __init__(self, blocks=(3, 4, 23), expansion=4, wpg=128):
        super().__init__()
        self.layer1 = _stage(64, 64, blocks[0], 1, expansion, wpg)
        self.layer2 = _stage(64 * expansion, 128, blocks[1], 2, expansion, wpg)
        self.layer3 = _stage(128 * expansion, 256, blocks[2], 2, expansion, wpg)

    def forward(self, x):
        a = self.layer1(x)
        b = self.layer2(a)
        return a, b, self.layer3(b)


class OCBE(nn.Module):
    """RD4AD's BN_layer (conv4 / bn4 defined but never run, as there)."""

    def __init__(self, blocks=3, expansion=4, wpg=128):
        super().__init__()
        e = expansion
        self.conv1, self.bn1 = conv3x3(64 * e, 128 * e, 2), nn.BatchNorm2d(128 * e)
        self.conv2, self.bn2 = conv3x3(128 * e, 256 * e, 2), nn.BatchNorm2d(256 * e)
        self.conv3, self.bn3 = conv3x3(128 * e, 256 * e, 2), nn.BatchNorm2d(256 * e)
        self.conv4, self.bn4 = conv1x1(1024 * e, 512 * e), nn.BatchNorm2d(512 * e)
        self.bn_layer = _stage(3 * 256 * e, 512, blocks, 2, e, wpg)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, a, b, c):
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(a))))))
        l2 = self.relu(self.bn3(self.conv3(b)))
        return self.bn_layer(torch.cat([l1, l2, c], 1))


class Stage1Decoder(nn.Module):
    """Mirrored Wide-ResNet-50-2; returns its outputs paired with a, b, c."""

    def __init__(self, blocks=(3, 4, 6), expansion=4, wpg=128):
        super().__init__()
        e = expansion
        self.layer1 = _stage(512 * e, 256, blocks[0], 2, e, wpg, DeBottleneck)
        self.layer2 = _stage(256 * e, 128, blocks[1], 2, e, wpg, DeBottleneck)
        self.layer3 = _stage(128 * e, 64, blocks[2], 2, e, wpg, DeBottleneck)

    def forward(self, z):
        d3 = self.layer1(z)
        d2 = self.layer2(d3)
        return self.layer3(d2), d2, d3


class Stage1Net(nn.Module):
    """The stage-1 graph; `forward` returns the golden file's arrays (NCHW).

    The published sizes by default; `tiny=True` is the golden file's tiny
    configuration (expansion 1, width per group 16, one block per stage).
    """

    def __init__(self, bands, tiny=False):
        super().__init__()
        e, wpg = (1, 16) if tiny else (4, 128)
        enc, ocbe, dec = ((1, 1, 1), 1, (1, 1, 1)) if tiny else \
            ((3, 4, 23), 3, (3, 4, 6))
        self.convh = ConvH(bands)
        self.encoder = Stage1Encoder(enc, e, wpg)
        self.ocbe = OCBE(ocbe, e, wpg)
        self.decoder = Stage1Decoder(dec, e, wpg)
        self.deconvh = nn.Module()
        self.deconvh.convh = conv1x1(64 * e, bands)
        self.classifier = PixelHead(bands, 64 * e)

    def forward(self, x):
        a, b, c = self.encoder(self.convh(x))
        z = self.ocbe(a, b, c)
        d1, d2, d3 = self.decoder(z)
        crop = (slice(None), slice(None), slice(PAD, -PAD), slice(PAD, -PAD))
        a_cut, d1_cut = a[crop], d1[crop]
        recon = self.deconvh.convh(d1_cut)
        head = self.classifier
        f21, f22 = head(a_cut), head(d1_cut)
        if torch.mean(torch.abs(a_cut - d1_cut)) != 0:
            prob = torch.sigmoid(head.conv3(torch.abs(f22 - f21)))
        else:
            prob = torch.zeros_like(f21[:, :1])
        return {"enc_f1": a, "enc_f2": b, "enc_f3": c, "enc_f1_cut": a_cut,
                "ocbe": z, "dec_f1": d1, "dec_f2": d2, "dec_f3": d3,
                "recon": recon, "prob": prob, "mixf_train": f21}

    def trainable_parameters(self):
        return [p for name, p in self.named_parameters()
                if not name.startswith("encoder.")]


def stage1_loss(out, x):
    """0.1 BCE-with-logits(prob, 0) (sic: prob is already a sigmoid)
    + 0.1 MSE(x, recon) + sum over levels of mean(1 - cos) (SPEC 4)."""
    bce = F.binary_cross_entropy_with_logits(out["prob"],
                                             torch.zeros_like(out["prob"]))
    mse = F.mse_loss(x, out["recon"])
    cos = sum(torch.mean(1 - F.cosine_similarity(
        out[f"enc_f{i}"].flatten(1), out[f"dec_f{i}"].flatten(1)))
        for i in (1, 2, 3))
    return 0.1 * bce + 0.1 * mse + cos, {"bce": bce, "mse": mse, "cos": cos}


def load_stage1(path, bands: int, tiny=False) -> Stage1Net:
    """A dict of state_dicts (encoder, ocbe, decoder, convh, deconvh,
    classifier), as the golden tiny stage-1 file holds, strictly."""
    model = Stage1Net(bands, tiny)
    parts = torch.load(path, map_location="cpu", weights_only=True)
    for name, sd in parts.items():
        getattr(model, name).load_state_dict(sd, strict=True)
    return model


class Stage1Step:
    """The reference's stage-1 training step: the encoder frozen in eval
    mode, everything else in train mode; Adam (lr 0.005, betas (0.5,
    0.999)) on ConvH, OCBE, decoder, de_ConvH and the classifier."""

    def __init__(self, model: Stage1Net, lr=0.005, betas=(0.5, 0.999)):
        self.model = model.train()
        model.encoder.eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr,
                                          betas=betas)

    def __call__(self, x) -> Dict[str, float]:
        total, terms = stage1_loss(self.model(x), x)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}


# --- RX (SPEC 6) ------------------------------------------------------------

def rx_numpy(cube: np.ndarray) -> np.ndarray:
    """The reference's NumPy RX of one (H, W, B) cube, in float64.

    Min-max the whole cube to [0, 1], mean and covariance over all pixels
    (/(N - 1)), np.linalg.pinv, squared Mahalanobis distance per pixel.
    """
    h, w, b = cube.shape
    x = np.asarray(cube, np.float64)
    x = (x - x.min()) / (x.max() - x.min())
    x = x.reshape(h * w, b)
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / (h * w - 1)
    return np.sum((xc @ np.linalg.pinv(cov)) * xc, axis=1).reshape(h, w)


def rx_torch(x: torch.Tensor) -> torch.Tensor:
    """The reference's batched torch RX, float32, torch.linalg.pinv.

    x (N, B, H, W) -> (N, 1, H, W). Min-max per image (the reference's
    broadcast only works for N = 1; for N = 1 this is the same).
    """
    n, b, h, w = x.shape
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    flat = ((x - lo) / (hi - lo)).reshape(n, b, h * w)
    xc = flat - flat.mean(dim=2, keepdim=True)
    cov = xc @ xc.transpose(1, 2) / (h * w - 1)
    scores = ((torch.linalg.pinv(cov) @ xc) * xc).sum(dim=1)
    return scores.reshape(n, 1, h, w)


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-image min-max of maps (N, 1, H, W) to [0, 1]."""
    lo = m.amin(dim=(1, 2, 3), keepdim=True)
    hi = m.amax(dim=(1, 2, 3), keepdim=True)
    return (m - lo) / (hi - lo)


def ferd_map(x: torch.Tensor, spe_f: torch.Tensor) -> np.ndarray:
    """FERD: NumPy RX(x + spe_f) per image; (N, H, W) float64."""
    cubes = (x + spe_f).permute(0, 2, 3, 1).numpy()
    return np.stack([rx_numpy(c) for c in cubes])


def fers_product_map(x, spe_f, spa_f) -> torch.Tensor:
    """FERS, <= 50 bands: minmax(RX(x + spa_f)) * minmax(RX(x + spe_f)),
    torch float32 RX; (N, H, W)."""
    return (minmax(rx_torch(x + spa_f)) * minmax(rx_torch(x + spe_f)))[:, 0]


# --- FLOP counting ----------------------------------------------------------

class ConvFlops:
    """Counts conv FLOPs (2 * multiply-adds) of the convs run inside it.

    Forward: 2 * N * Cout * Hout * Wout * Cin/groups * kh * kw per conv.
    Backward (when `backward=True` and grad is on): the same again for the
    input gradient if the conv's input requires grad, and again for the
    weight gradient if its weight does. Non-conv work (BN, pooling, RX,
    elementwise) is not counted.

        with ConvFlops(model) as c:
            model(x)
        c.forward, c.backward
    """

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.forward = 0
        self.backward = 0
        self._hooks = []

    def _hook(self, m, inputs, out):
        flops = 2 * out.numel() * (m.in_channels // m.groups) * \
            m.kernel_size[0] * m.kernel_size[1]
        self.forward += flops
        if torch.is_grad_enabled():
            self.backward += flops * (int(inputs[0].requires_grad)
                                      + int(m.weight.requires_grad))

    def __enter__(self):
        for module in self.modules:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    self._hooks.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def total(self):
        return self.forward + self.backward


# --- Golden check -----------------------------------------------------------

def _golden(name):
    with np.load(GOLDEN / name) as f:
        return {k: f[k] for k in f.files}


def _err(out, ref):
    """(max abs error, max |ref|)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().numpy()
    return float(np.abs(out - ref).max()), float(np.abs(ref).max())


def check_against_golden(verbose: bool = True, rtol: float = 1e-4) -> Dict[str, dict]:
    """Runs this baseline on the golden inputs; max errors per output.

    Checks the published 50- and 100-band teachers (spe_f), the random
    student at 64x64 (spa_f, false_rgb), the FRN, the stage-2 loss terms and
    the gradients of the total w.r.t. spa_f and rec, the tiny stage-1 graph
    (training-mode forward, loss terms, three gradients) and both RX forms.

    Returns:
      {name: {'max_abs_err', 'scale', 'ok'}}; ok is err <= rtol * scale
      (scale = max |reference|).

    Raises:
      AssertionError if any check fails.
    """
    torch.manual_seed(0)
    results = {}

    def record(name, out, ref):
        err, scale = _err(out, ref)
        results[name] = {"max_abs_err": err, "scale": scale,
                         "ok": bool(err <= rtol * max(scale, 1e-30))}

    with torch.inference_mode():
        for bands in (50, 100):
            g = _golden(f"teacher_had100_{bands}bands.npz")
            teacher = load_teacher(CHECKPOINTS / f"{bands}bands", bands)
            record(f"teacher_{bands}bands.spe_f",
                   teacher(torch.from_numpy(g["x"])), g["spe_f"])
        g = _golden("student_50bands_64x64.npz")
        student = load_student(GOLDEN / "spa_fen_random_50bands.pt", 50)
        spa_f, rgb = student(torch.from_numpy(g["x"]))
        record("student_50bands_64x64.spa_f", spa_f, g["spa_f"])
        record("student_50bands_64x64.false_rgb", rgb, g["false_rgb"])
        g = _golden("frn_50bands.npz")
        frn = load_frn(GOLDEN / "frn_random_50bands.pt", 50)
        record("frn_50bands.out", frn(torch.from_numpy(g["x"])), g["out"])

    g = _golden("losses_stage2.npz")
    spa_f = torch.from_numpy(g["spa_f"]).requires_grad_(True)
    rec = torch.from_numpy(g["rec"]).requires_grad_(True)
    total, terms = stage2_loss(torch.from_numpy(g["spe_f"]), spa_f, rec,
                               torch.from_numpy(g["data"]))
    total.backward()
    for name, key in (("cc", "cross_cov"), ("cos", "cos_sim"),
                      ("var", "var_preserve"), ("mse", "mse"), ("ssim", "ssim5")):
        record(f"losses_stage2.{key}", terms[name], g[key])
    record("losses_stage2.total", total, g["total"])
    record("losses_stage2.grad_spa_f", spa_f.grad, g["grad_spa_f"])
    record("losses_stage2.grad_rec", rec.grad, g["grad_rec"])

    g = _golden("stage1_tiny_20bands.npz")
    model = load_stage1(GOLDEN / "stage1_tiny_random_20bands.pt", 20, tiny=True)
    Stage1Step(model)  # the training modes, as the golden forward ran
    x = torch.from_numpy(g["x"])
    out = model(x)
    loss, terms = stage1_loss(out, x)
    loss.backward()
    for key in ("enc_f1", "enc_f2", "enc_f3", "enc_f1_cut", "ocbe", "dec_f1",
                "dec_f2", "dec_f3", "recon", "prob", "mixf_train"):
        record(f"stage1_tiny.{key}", out[key], g[key])
    for key in ("bce", "mse", "cos"):
        record(f"stage1_tiny.{key}", terms[key], g[key])
    record("stage1_tiny.loss", loss, g["loss"])
    record("stage1_tiny.grad_convh", model.convh.convh.weight.grad, g["grad_convh"])
    record("stage1_tiny.grad_pc_conv1", model.classifier.conv1.weight.grad,
           g["grad_pc_conv1"])
    record("stage1_tiny.grad_dec_layer1_0_conv1",
           model.decoder.layer1[0].conv1.weight.grad,
           g["grad_dec_layer1_0_conv1"])

    g = _golden("rx.npz")
    x = torch.from_numpy(g["x"])
    record("rx.rx_numpy", rx_numpy(g["x"][0].transpose(1, 2, 0)), g["rx_numpy"])
    with torch.inference_mode():
        record("rx.rx_batched", rx_torch(x), g["rx_batched"])

    if verbose:
        print(f"torch baseline vs golden (ok: max abs err <= {rtol:g} * max|ref|)")
        for name, r in results.items():
            print(f"  {name:36s} err {r['max_abs_err']:.3e}  scale "
                  f"{r['scale']:.3e}  {'ok' if r['ok'] else 'FAIL'}")
    failed = [k for k, r in results.items() if not r["ok"]]
    assert not failed, f"torch baseline differs from the golden outputs: {failed}"
    return results


if __name__ == "__main__":
    torch.set_num_threads(2)
    check_against_golden()
