"""The contract test every registered loss passes, built-in or plugin: `check_loss("my_loss")` in your own test.

    from kdray.testing import check_loss

    def test_my_loss_keeps_the_contract():
        check_loss("my_loss", temperature=2.0)   # options of `losses.my_loss`; `enabled` is set for you

The loss is built through its spec (`LossSpec.make`, with K classes and C_S != C_T channels at every tap it
reads), fed random tensors for exactly the inputs its spec reads (`kdray.losses.inputs`), called with the
spec's keyword arguments as the objective calls it, and held to the contract of `kdray.losses.registry`:

- `value`: a finite float32 scalar;
- `gradients`: none reaches a teacher tensor, some reaches the student's;
- `parameters`: every parameter trained with the student (adapters) gets a gradient; an `OwnedStep`'s loss is
  a scalar giving gradients to its own parameters, which the student's backward leaves untouched (.grad None);
- `autocast`: float32 under `torch.autocast("cpu", dtype=torch.bfloat16)` with bfloat16 inputs;
- `empty`: an empty batch (N = 0) gives exactly 0.0, still connected to the graph (backward runs); all-ignore
  labels give exactly 0.0 for a loss that reads labels (a finite value, backward running, for one registered
  with `labelled_only=False`);
- `bad_labels`: labels of a wrong shape or dtype raise one `KdrayError` naming the loss and the shape;
- `pickle`: the module pickles (Ray ships it) and the copy gives the same value.

Each failure is an `AssertionError` naming the loss and the check. Plain PyTorch (no pytest), deterministic
(a fixed seed, in a forked RNG that leaves the caller's random stream alone), on small CPU tensors.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdray.config.loading import build
from kdray.errors import KdrayError
from kdray.losses.inputs import HEAD, LABELS, LABELS_AT_LOGITS, StepInput, StepTensors
from kdray.losses.labels import downsample_labels
from kdray.losses.registry import LossContext, LossSpec, loss_spec

__all__ = ["CHECKS", "LossChecker", "check_loss"]

CHECKS = ("value", "gradients", "parameters", "autocast", "empty", "bad_labels", "pickle")
IGNORE = 255


def check_loss(name: str, **options: Any) -> None:
    """Run every check of `LossChecker` on the registered loss `name` with the config options `options`."""
    LossChecker(name, options).check_all()


class LossChecker:
    """The checks of the module docstring for one loss and options; `check_<name>()` runs one of them.

    Sizes: N images, K classes, logits (N, K, h, w), features (N, C_S or C_T, h, w) at every tap, labels
    and images at 8h × 8w (output stride 8) with about a fifth of the pixels ignored (`IGNORE`).
    """

    N, K, C_S, C_T, h, w = 2, 5, 4, 6, 4, 6

    def __init__(self, name: str, options: Mapping[str, Any] | None = None, seed: int = 0):
        self.name, self.options, self.seed = name, dict(options or {}), seed
        self.spec: LossSpec = loss_spec(name)
        # as a job's `losses.<name>` section is read: an unknown option gets a did-you-mean, a bad type a line
        self.config = build(self.spec.config, {**self.options, "enabled": True}, f"losses.{name}")
        self.spec.check(self.config)
        self.reads = self.spec.inputs(self.config)  # {forward argument: StepInput}
        self.owned_reads = self.spec.owned.inputs(self.config) if self.spec.owned is not None else {}
        self.keys = {i.key for i in self.spec.all_inputs(self.config)}
        self.label_keys = sorted(self.keys & {LABELS.key, LABELS_AT_LOGITS.key})

    def check_all(self) -> None:
        """Every check in turn; any exception a check meets becomes an AssertionError naming the loss and it."""
        for check in CHECKS:
            try:
                getattr(self, f"check_{check}")()
            except AssertionError:
                raise
            except Exception as err:
                self._fail(check, f"raised {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ the checks
    def check_value(self) -> None:
        value = self._call(self._module(), self._tensors(), "value")
        self._expect(value.dtype == torch.float32, "value", f"returned {value.dtype}, expected torch.float32")
        self._expect(bool(torch.isfinite(value)), "value", f"returned {value.item()}, expected a finite number")

    def check_gradients(self) -> None:
        t = self._tensors()
        self._call(self._module(), t, "gradients").backward()
        for key, x in t.items():
            leak = x.grad is not None and bool(x.grad.ne(0).any())
            self._expect(not (key.startswith("teacher.") and leak), "gradients",
                         f"a gradient reached the teacher's {key}: teacher inputs must be detached")
        reached = {k: x.grad for k, x in t.items() if k.startswith("student.") and x.grad is not None}
        self._expect(bool(reached), "gradients", f"no gradient reached any student input of {sorted(t)}")
        for key, grad in reached.items():
            self._expect(bool(grad.isfinite().all()), "gradients", f"the gradient of {key} is not finite")

    def check_parameters(self) -> None:
        module, t = self._module(), self._tensors()
        owned = self._owned_parameters(module)
        self._call(module, t, "parameters").backward()
        for pname, p in module.named_parameters():
            if id(p) in owned:
                self._expect(p.grad is None, "parameters",
                             f"the student's backward gave a gradient to {pname}, a parameter of its own optimizer")
            else:
                self._expect(p.grad is not None, "parameters",
                             f"{pname} gets no gradient (an adapter the loss does not use?)")
        if self.spec.owned is None:
            return
        step = self.spec.owned
        value = self._owned_loss(module, t)
        self._expect(isinstance(value, Tensor) and value.dim() == 0, "parameters",
                     f"{step.loss} returned {_describe(value)}, expected a 0-d tensor")
        value.backward()
        missing = [n for n, p in module.named_parameters() if id(p) in owned and p.grad is None]
        self._expect(not missing, "parameters", f"{step.loss} gives no gradient to its own {missing}")

    def check_autocast(self) -> None:
        t = self._tensors(dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = self._call(self._module(), t, "autocast")
        self._expect(value.dtype == torch.float32, "autocast",
                     f"returned {value.dtype} under bfloat16 autocast, expected torch.float32")
        self._expect(bool(torch.isfinite(value)), "autocast", f"returned {value.item()} under bfloat16 autocast")

    def check_empty(self) -> None:
        cases = {"an empty batch (N = 0)": self._tensors(batch=0)}
        if self.label_keys:
            cases["all-ignore labels"] = self._tensors(ignore_all=True)
        for case, t in cases.items():
            module = self._module()
            value = self._call(module, t, "empty")
            if case == "all-ignore labels" and not self.spec.labelled_only:
                self._expect(value.dim() == 0 and bool(torch.isfinite(value)), "empty",
                             f"gave {_describe(value)} on {case}, expected a finite scalar")
                value.backward()
                continue
            self._expect_zero(value, case)
            if self.spec.owned is not None and case.startswith("an empty"):
                self._expect_zero(self._owned_loss(module, t), f"{case}, in {self.spec.owned.loss}")

    def check_bad_labels(self) -> None:
        for key in self.label_keys:
            good = self._tensors()[key]
            bad = {"2-d": good[:, 0], "one image too many": torch.cat([good, good[:1]]), "float": good.float()}
            for case, labels in bad.items():
                t = self._tensors().replace({key: labels})
                try:
                    self._call(self._module(), t, "bad_labels")
                except KdrayError as err:
                    message = str(err)
                    named = self.spec.module.__name__ in message or self.name in message
                    self._expect(named and str(tuple(labels.shape)) in message, "bad_labels",
                                 f"{key} {case} {tuple(labels.shape)}: the error must name the loss and that "
                                 f"shape, got: {message}")
                except Exception as err:  # noqa: BLE001 - any other error is the failure being reported
                    self._fail("bad_labels", f"{key} {case} {tuple(labels.shape)} {labels.dtype} raised "
                                             f"{type(err).__name__}: {err}; expected a kdray.errors.PreflightError")
                else:
                    self._fail("bad_labels", f"{key} {case} {tuple(labels.shape)} {labels.dtype} was accepted")

    def check_pickle(self) -> None:
        module = self._module()
        try:
            copy = pickle.loads(pickle.dumps(module))
        except Exception as err:  # noqa: BLE001
            self._fail("pickle", f"the module does not pickle: {type(err).__name__}: {err}")
        first, second = (self._call(m, self._tensors(), "pickle").detach() for m in (module, copy))
        self._expect(torch.equal(first, second), "pickle",
                     f"the unpickled module gives {second.item()}, the original {first.item()}")

    # ------------------------------------------------------------------ building blocks
    def _module(self) -> nn.Module:
        """A fresh module, its parameters drawn from the fixed seed."""
        taps = {side: {HEAD} | self.spec.taps(self.config, side) for side in ("student", "teacher")}
        context = LossContext(self.K, IGNORE, {tap: self.C_S for tap in taps["student"]},
                              {tap: self.C_T for tap in taps["teacher"]})
        return self._seeded(lambda: self.spec.make(self.config, context))

    def _tensors(self, batch: int | None = None, dtype: torch.dtype = torch.float32,
                 ignore_all: bool = False) -> StepTensors:
        """Random tensors for every input the loss and its owned step read; floating ones require gradients."""
        n = self.N if batch is None else batch
        g = torch.Generator().manual_seed(self.seed)
        labels = torch.randint(0, self.K, (n, 8 * self.h, 8 * self.w), generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.2] = IGNORE
        if ignore_all:
            labels.fill_(IGNORE)
        out: dict[str, Tensor] = {LABELS.key: labels, LABELS_AT_LOGITS.key: downsample_labels(labels, (self.h, self.w))}
        for key in sorted(self.keys - set(out)):
            i = StepInput(key)
            channels = {"features": self.C_S if i.side == "student" else self.C_T, "images": 3}.get(i.kind, self.K)
            size = (8 * self.h, 8 * self.w) if i.kind == "images" else (self.h, self.w)
            x = torch.randn(n, channels, *size, generator=g).to(dtype)
            out[key] = x.requires_grad_(i.kind != "images")
        return StepTensors({k: v for k, v in out.items() if k in self.keys})

    def _call(self, module: nn.Module, t: StepTensors, check: str) -> Tensor:
        """The loss on `t`, as `DistillationObjective.term` calls it; it must be a 0-d tensor."""
        value = self._seeded(lambda: module(**{arg: t.get(i) for arg, i in self.reads.items()}))
        self._expect(isinstance(value, Tensor) and value.dim() == 0, check,
                     f"returned {_describe(value)}, expected a 0-d tensor")
        return value

    def _owned_loss(self, module: nn.Module, t: StepTensors) -> Tensor:
        """The owned step's loss on `t`, as `DistillationObjective.owned_loss` calls it (inputs detached)."""
        inputs = {arg: _detached(t.get(i)) for arg, i in self.owned_reads.items()}
        return self._seeded(lambda: getattr(module, self.spec.owned.loss)(**inputs))

    def _expect_zero(self, value: Tensor, case: str) -> None:
        zero = value.dim() == 0 and value.dtype == torch.float32 and value.item() == 0.0
        self._expect(zero, "empty", f"gave {_describe(value)} on {case}, expected exactly 0.0 (float32, 0-d)")
        self._expect(value.requires_grad, "empty", f"gave a value without a graph on {case}")
        value.backward()  # raises if the zero is connected to nothing

    def _owned_parameters(self, module: nn.Module) -> set[int]:
        step = self.spec.owned
        return {id(p) for p in step.parameters(module)} if step is not None else set()

    def _seeded(self, make: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return make()

    def _expect(self, ok: bool, check: str, message: str) -> None:
        if not ok:
            self._fail(check, message)

    def _fail(self, check: str, message: str) -> None:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        raise AssertionError(f"check_loss({self.name!r}{options}), check {check!r}: {message}")


def _detached(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        number = f" = {value.item()}" if value.numel() == 1 else ""
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{number}"
    return repr(value)
