"""SKD's holistic loss: a discriminator tells teacher score maps from student ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option
from kdray.errors import PreflightError
from kdray.losses import _checks
from kdray.losses.discriminator import Discriminator
from kdray.losses.inputs import IMAGES, STUDENT_LOGITS, TEACHER_LOGITS
from kdray.losses.registry import LossConfig, OwnedStep, register_loss

CONDITIONINGS = ("logits", "logits+image")
OBJECTIVES = ("hinge", "wgan_gp")


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Record a forward through `module` without its parameters in the graph (gradients still flow to the
    inputs), so the student's backward leaves the discriminator's .grad untouched."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)



HINGE_STUDENT_WEIGHT = 0.001  # SKD's w_adv: the student's adversarial term under the hinge objective


@dataclass
class AdversarialConfig(LossConfig):
    """`losses.adversarial`: see `AdversarialDistillation`; `d_lr` and `d_betas` are its discriminator's Adam."""

    # The student's term `−weight · mean D(z_S)`. None: the published one, w_adv = 0.001 under hinge, and under
    # wgan_gp w_d, the discriminator's own weight (`d_weight`, 0.1), whatever it is set to.
    weight: float | None = option(None, at_least=0)
    conditioning: Literal["logits", "logits+image"] = "logits"
    objective: Literal["hinge", "wgan_gp"] = "hinge"
    d_weight: float = option(0.1, above=0)
    gp_weight: float = option(10.0, at_least=0)
    d_lr: float = option(4e-4, above=0, constructor=False)
    d_betas: tuple[float, float] = option((0.9, 0.99), at_least=0, below=1, constructor=False)

    def term_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        return self.d_weight if self.objective == "wgan_gp" else HINGE_STUDENT_WEIGHT


def _with_images(cfg: AdversarialConfig, reads: dict) -> dict:
    return {**reads, "images": IMAGES} if cfg.conditioning == "logits+image" else reads


_DISCRIMINATOR_STEP = OwnedStep(
    label="discriminator",
    parameters=lambda module: module.discriminator.parameters(),
    optimizer=lambda params, cfg: torch.optim.Adam(params, lr=cfg.d_lr, betas=cfg.d_betas),
    loss="discriminator_loss",
    reads=lambda cfg: _with_images(cfg, {"teacher_logits": TEACHER_LOGITS, "student_logits": STUDENT_LOGITS}),
    graphable=lambda cfg: cfg.objective == "hinge",  # WGAN-GP draws mixing weights and backpropagates twice
)


@register_loss("adversarial", position=50, config=AdversarialConfig, label="HO", owned=_DISCRIMINATOR_STEP,
               reads=lambda cfg: _with_images(cfg, {"student_logits": STUDENT_LOGITS}))
class AdversarialDistillation(nn.Module):
    """SKD holistic distillation: teacher logits are "real", student logits "fake" for a critic D.

    With `D(z)` the per-sample score (mean of the discriminator's output map, see `Discriminator`):

    - `forward` returns the student's term `L_adv = −mean_n D(z_S)`, unweighted: the objective applies
      `losses.adversarial.weight`, by default w_adv = 0.001 under hinge and w_d (`d_weight`) under WGAN-GP.
      Gradients reach the student logits only: D runs with its parameters' requires_grad off for this call.
    - `discriminator_loss` returns D's loss, on detached student logits (weights included):
      hinge: `L_D = w_d·(mean_n relu(1 − D_n(z_T)) + mean_n relu(1 + D_n(z_S)))`;
      wgan_gp: `L_D = w_d·(mean_n D_n(z_S) − mean_n D_n(z_T)) + w_d·gp_weight·mean_n (‖∇_x̂ D_n(x̂)‖₂ − 1)²`,
      `x̂_n = α_n z_T,n + (1 − α_n) z_S,n`, α_n ~ U(0, 1), the gradient of `Σ_n D_n(x̂)` taken w.r.t. x̂ and
      its norm per sample (with D's BatchNorm in training mode the samples of a batch interact a little; that
      is how the public code runs it too).

    D's order of calls within `discriminator_loss` is D(z_T), D(z_S), then D(x̂); each call in training mode
    updates its BatchNorm statistics and one spectral-norm power iteration.

    `conditioning="logits+image"` concatenates the RGB input, resized bilinearly to h×w, to the logits of
    both (and to x̂, which interpolates the logits only), as the SKD paper describes; the public code uses
    logits only (the default).

    The engine owns D's optimizer (Adam, lr 4e-4, betas (0.9, 0.99)) and runs one D step per student step,
    after it. All of this module's parameters are D's: none belong in the student's optimizer. D's state is
    part of every checkpoint (this module's state_dict).

    Shapes: student_logits, teacher_logits (N, K, h, w) with h, w ≥ 2; images (N, 3, H, W) for
    `logits+image`. Both methods return a scalar.

    Papers: Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019,
    arXiv:1903.04197; hinge loss and critic: Zhang et al., SAGAN, arXiv:1805.08318; WGAN-GP: Gulrajani et al.,
    "Improved Training of Wasserstein GANs", NeurIPS 2017, arXiv:1704.00028.
    """

    def __init__(
        self,
        num_classes: int,
        conditioning: str = "logits",
        objective: str = "hinge",
        d_weight: float = 0.1,
        gp_weight: float = 10.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_classes = _checks.positive_int(owner, "num_classes", num_classes)
        self.conditioning = _checks.choice(owner, "conditioning", conditioning, CONDITIONINGS)
        self.objective = _checks.choice(owner, "objective", objective, OBJECTIVES)
        self.d_weight = _checks.number(owner, "d_weight", d_weight, positive=True)
        self.gp_weight = _checks.number(owner, "gp_weight", gp_weight)
        extra = 3 if self.conditioning == "logits+image" else 0
        self.discriminator = Discriminator(num_classes + extra)

    def _input(self, logits: Tensor, images: Tensor | None) -> Tensor:
        owner = type(self).__name__
        if logits.dim() != 4 or logits.shape[1] != self.num_classes or min(logits.shape[-2:]) < 2:
            raise PreflightError(
                f"{owner}: logits {tuple(logits.shape)} must be (N, {self.num_classes}, h, w) with h, w >= 2"
            )
        if self.conditioning == "logits":
            return logits
        if images is None or images.dim() != 4 or images.shape[:2] != (logits.shape[0], 3):
            shape = None if images is None else tuple(images.shape)
            raise PreflightError(f"{owner}: conditioning='logits+image' needs images (N, 3, H, W), got {shape}")
        resized = F.interpolate(images.detach(), size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([logits, resized.to(logits.dtype)], dim=1)

    def score(self, logits: Tensor, images: Tensor | None = None) -> Tensor:
        """`D_n(z)`: the mean of D's output map per sample, (N,); at least float32 (under autocast D runs in
        half precision, and the hinge's `1 ± D` would keep only 8 significant bits in bf16)."""
        out = self.discriminator(self._input(logits, images))
        return out.to(torch.promote_types(out.dtype, torch.float32)).mean(dim=(1, 2, 3))

    def forward(self, student_logits: Tensor, images: Tensor | None = None) -> Tensor:
        if student_logits.shape[0] == 0:
            return _checks.empty_batch(student_logits)
        with _frozen(self.discriminator):
            return -self.score(student_logits, images).mean()

    def discriminator_loss(
        self,
        teacher_logits: Tensor,
        student_logits: Tensor,
        images: Tensor | None = None,
        alpha: Tensor | None = None,
    ) -> Tensor:
        """L_D (see the class docstring). `alpha`: (N,) WGAN-GP mixing weights, drawn U(0, 1) when None."""
        owner = type(self).__name__
        _checks.same_shape(owner, "student_logits", student_logits, "teacher_logits", teacher_logits)
        if student_logits.shape[0] == 0:  # zero gradients for D, not the NaNs of BatchNorm and a mean over nothing
            return _checks.empty_batch(student_logits, *self.discriminator.parameters())
        real, fake = teacher_logits.detach(), student_logits.detach()
        score_real, score_fake = self.score(real, images), self.score(fake, images)
        if self.objective == "hinge":
            return self.d_weight * (F.relu(1 - score_real).mean() + F.relu(1 + score_fake).mean())

        if alpha is None:
            alpha = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
        alpha = alpha.to(real.dtype).view(-1, 1, 1, 1)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.score(mixed, images).sum(), mixed, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        critic = score_fake.mean() - score_real.mean()
        return self.d_weight * critic + self.d_weight * self.gp_weight * penalty
