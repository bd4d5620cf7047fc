"""Stage-1 reverse-distillation graph, FERD (SPEC 4).

ConvH -> frozen Wide-ResNet-101-2 encoder (stages 1-3, always eval-mode
BatchNorm) -> one-class bottleneck (OCBE) -> mirrored decoder -> de_ConvH,
plus the training form of the pixel classifier. Everything comes back in a
dict so the loss can pair encoder and decoder levels.

Typical training use (ConvH, OCBE, decoder, de_ConvH and classifier train;
the encoder's parameters ride along frozen, masked out of the optimiser):

    out, updates = FerdNet(cfg).apply(variables, x, train=True,
                                      mutable=["batch_stats"])

The encoder's running statistics come back unchanged in `updates`.
"""

import flax.linen as nn
import jax.numpy as jnp

from fers_jax.configs import FerdConfig
from fers_jax.errors import InputError
from fers_jax.models import layers
from fers_jax.models.teacher import ConvH, check_bands


class OneClassBottleneck(nn.Module):
    """RD4AD's BN_layer: fuses encoder levels a, b, c into one embedding.

    l1 = ReLU(BN(conv3x3 s2(ReLU(BN(conv3x3 s2(a)))))), l2 = ReLU(BN(conv3x3
    s2(b))), then bottlenecks (planes 512, first one stride 2) on
    concat[l1, l2, c]. The reference's `conv4` / `bn4` are defined there but
    never run; they are left out here (the converter skips their keys).
    """
    blocks: int = 3
    expansion: int = 4
    width_per_group: int = 128

    @nn.compact
    def __call__(self, a, b, c, train: bool = False):
        e = self.expansion
        norm = lambda name: layers.BatchNorm(use_running_average=not train,
                                             name=name)
        l1 = nn.relu(norm("bn1")(layers.conv3x3(128 * e, 2, name="conv1")(a)))
        l1 = nn.relu(norm("bn2")(layers.conv3x3(256 * e, 2, name="conv2")(l1)))
        l2 = nn.relu(norm("bn3")(layers.conv3x3(256 * e, 2, name="conv3")(b)))
        x = jnp.concatenate([l1, l2, c], axis=-1)
        for j in range(self.blocks):
            x = layers.Bottleneck(512, 2 if j == 0 else 1, e, self.width_per_group,
                                  name=f"bn_layer_{j}")(x, train)
        return x


class Decoder(nn.Module):
    """Mirrored Wide-ResNet-50-2: stages at planes 256, 128, 64, each doubling
    H and W in its first (de-bottleneck) block.

    Returns the stage outputs last-first, so that element i pairs with the
    encoder's stage i (same shape).
    """
    blocks: tuple = (3, 4, 6)
    expansion: int = 4
    width_per_group: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        outputs = []
        for i, n in enumerate(self.blocks):
            for j in range(n):
                x = layers.Bottleneck(256 // 2 ** i, 1, self.expansion,
                                      self.width_per_group, upsample=(j == 0),
                                      name=f"layer{i + 1}_{j}")(x, train)
            outputs.append(x)
        return outputs[::-1]


class PixelClassifier(nn.Module):
    """Training form of the reference's Pixel_Classifier.

    f21 = head(x1), f22 = head(x2); prob = sigmoid(conv3(|f22 - f21|)) where
    mean|x1 - x2| != 0, else 0 (a jnp.where, so it traces under jit).
    Returns {'prob': (N, H, W, 1), 'logits': conv3's output before the
    sigmoid (never zeroed), 'mixf': f21}; f21 is the reference's `mixf`,
    which is also the teacher's spe_f when x1 is the cropped encoder output.
    """
    hidden: int
    bands: int

    @nn.compact
    def __call__(self, x1, x2):
        head = layers.PixelHead(self.hidden, self.bands, name="head")
        f21, f22 = head(x1), head(x2)
        logits = layers.biased_conv1x1(1, self.bands, name="conv3")(
            jnp.abs(f22 - f21))
        differ = jnp.mean(jnp.abs(x1 - x2)) != 0
        prob = jnp.where(differ, nn.sigmoid(logits), jnp.zeros_like(logits))
        return {"prob": prob, "logits": logits, "mixf": f21}


def size_fits(n: int, cfg: FerdConfig) -> bool:
    """Whether the stage-1 graph takes images `n` pixels high (or wide).

    Three stride-2 steps (encoder 2, OCBE 1) that the decoder undoes: other
    sizes leave encoder and decoder levels of different shapes.
    """
    return (n + 2 * cfg.pad) % 8 == 0


class FerdNet(nn.Module):
    """x (N, H, W, B) -> dict of every intermediate, NHWC:

    enc_f1, enc_f2, enc_f3: encoder a, b, c at padded size (H+2p, W+2p), /2, /4;
    enc_f1_cut: a cropped to (H, W); ocbe: the embedding;
    dec_f1, dec_f2, dec_f3: decoder outputs paired with enc_f1..3;
    recon: de_ConvH of the cropped dec_f1, (N, H, W, B);
    prob: classifier output (N, H, W, 1), already through a sigmoid;
    logits: the classifier's conv3 output before that sigmoid;
    mixf: head(enc_f1_cut), the teacher's spe_f (N, H, W, B).

    `train` puts OCBE and decoder BatchNorm in batch-statistics mode; the
    encoder's always uses its running statistics (frozen ImageNet net,
    eval mode in the reference). The classifier runs in its training form
    in both modes; its test-time form (encoder output twice) has prob 0 and
    mixf as here.
    """
    config: FerdConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        check_bands(x, cfg.bands, "stage-1 graph")
        if not all(size_fits(n, cfg) for n in x.shape[1:3]):
            raise InputError(
                f"the stage-1 graph needs H + {2 * cfg.pad} and W + "
                f"{2 * cfg.pad} divisible by 8; got H, W = {x.shape[1:3]}")
        xp = ConvH(cfg.stem_width, cfg.pad, name="convh")(x)
        a, b, c = layers.ResNetStages(cfg.encoder_blocks, cfg.expansion,
                                      cfg.width_per_group, name="encoder")(
                                          xp, train=False)
        z = OneClassBottleneck(cfg.ocbe_blocks, cfg.expansion,
                               cfg.width_per_group, name="ocbe")(a, b, c, train)
        d1, d2, d3 = Decoder(cfg.decoder_blocks, cfg.expansion,
                             cfg.width_per_group, name="decoder")(z, train)
        a_cut, d1_cut = layers.crop(a, cfg.pad), layers.crop(d1, cfg.pad)
        recon = layers.conv1x1(cfg.bands, kernel_init=layers.torch_default_init,
                               name="deconvh")(d1_cut)
        classified = PixelClassifier(cfg.head_width, cfg.bands,
                                     name="classifier")(a_cut, d1_cut)
        return {"enc_f1": a, "enc_f2": b, "enc_f3": c, "enc_f1_cut": a_cut,
                "ocbe": z, "dec_f1": d1, "dec_f2": d2, "dec_f3": d3,
                "recon": recon, **classified}


def teacher_variables(stage1_variables, config: FerdConfig):
    """The SpectralTeacher's variables inside stage-1 (FerdNet) variables.

    ConvH, encoder layer1 and the classifier's head: the FEN the reference
    keeps after stage 1.
    """
    layer1 = [f"layer1_{j}" for j in range(config.encoder_blocks[0])]
    out = {}
    for col, tree in stage1_variables.items():
        part = {}
        if "convh" in tree:
            part["convh"] = tree["convh"]
        enc = {k: tree["encoder"][k] for k in layer1
               if k in tree.get("encoder", {})}
        if enc:
            part["encoder"] = enc
        if "head" in tree.get("classifier", {}):
            part["head"] = tree["classifier"]["head"]
        if part:
            out[col] = part
    return out
