"""The 1×1 adapter that maps student features to the teacher's width."""

from __future__ import annotations

from torch import Tensor, nn

from kdray.losses import _checks


class FeatureAdapter(nn.Module):
    """`f_S ↦ W f_S`, a 1×1 convolution without bias from C_S to C_T channels.

    student: (N, C_S, h, w) -> (N, C_T, h, w). Always a convolution, also when C_S == C_T, so every
    configuration trains the same parameters; it belongs to the loss that owns it and its parameters go to the
    student's optimizer.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        owner = type(self).__name__
        self.student_channels = _checks.positive_int(owner, "student_channels", student_channels)
        self.teacher_channels = _checks.positive_int(owner, "teacher_channels", teacher_channels)
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student_features: Tensor) -> Tensor:
        return self.conv(student_features)
