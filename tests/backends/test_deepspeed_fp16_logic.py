"""fp16 logic of the DeepSpeed backend at unit level (this CPU has no fp16 kernels; the GPU check
script runs it end to end): the mask is taken in unscaled units and a skipped step goes through
DeepSpeed's overflow path."""

from __future__ import annotations

import torch

from bidrop_ds.backends.deepspeed_zero import DeepSpeedBackend
from bidrop_ds.core import LocalCommunicator, PassStatistics, global_threshold, kept_count, scores_into_m2


class RecordingEngine:
    """Stands in for a DeepSpeed engine: only the calls the backend's fp16 paths make."""

    class Optimizer:
        loss_scale = 2.0 ** 16

    def __init__(self, fp16: bool) -> None:
        self.optimizer = self.Optimizer()
        self.fp16 = fp16
        self.boundary = None
        self.steps = []

    def fp16_enabled(self) -> bool:
        return self.fp16

    def set_gradient_accumulation_boundary(self, value: bool) -> None:
        self.boundary = value

    def step(self) -> None:
        self.steps.append(self.boundary)


class FixedPartition:
    def __init__(self, views: list[torch.Tensor]) -> None:
        self._views = views
        self.skips = 0

    def skipped(self) -> None:
        self.skips += 1

    def views(self) -> list[torch.Tensor]:
        return self._views


def backend_with(engine: RecordingEngine, segments: list[torch.Tensor]) -> DeepSpeedBackend:
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)  # the attributes these paths use
    backend.engine, backend.partition = engine, FixedPartition(segments)
    return backend


def test_fp16_skip_takes_deepspeeds_overflow_path():
    segments = [torch.randn(5), torch.randn(3, dtype=torch.float16)]
    engine = RecordingEngine(fp16=True)
    backend_with(engine, segments).skip_step()
    assert all(torch.isinf(s).all() for s in segments), "DeepSpeed must see the overflow"
    assert engine.steps == [True], "one engine.step() at a boundary, so the loss scale backs off"


def test_non_fp16_skip_zeroes_and_does_not_step():
    segments = [torch.randn(5)]
    engine = RecordingEngine(fp16=False)
    backend = backend_with(engine, segments)
    backend.skip_step()
    assert torch.equal(segments[0], torch.zeros(5)) and engine.steps == []
    assert backend.partition.skips == 1  # DeepSpeed's accumulation window ends as its step would end it


def test_loss_scale_is_read_from_deepspeed_only_for_fp16():
    assert backend_with(RecordingEngine(fp16=True), []).grad_scale() == 2.0 ** 16
    assert backend_with(RecordingEngine(fp16=False), []).grad_scale() == 1.0


def test_fp16_loss_scaled_passes_give_the_unscaled_mask():
    """Passes as fp16 engines hold them (scaled by 2^16, stored in fp16) give the same mask as the
    unscaled fp32 passes when the scale is declared."""
    g = torch.Generator().manual_seed(0)
    passes = [torch.randn(4096, generator=g) * 1e-4 + 2e-4 for _ in range(2)]
    abs_param = torch.rand(4096, generator=g) * 0.05
    masks = []
    for scale, dtype in [(1.0, torch.float32), (2.0 ** 16, torch.float16)]:
        stats = PassStatistics(4096)
        for grad in passes:
            stats.update((grad.to(dtype) * scale).to(dtype) if dtype == torch.float16 else grad)
        scores = scores_into_m2(stats, abs_param, "product", 1e-8, grad_scale=scale)
        masks.append(scores >= global_threshold(scores, kept_count(0.3, 4096), LocalCommunicator()).value)
    # fp16 storage rounds each gradient (2^-11 relative), so a few borderline elements may move.
    assert (masks[0] != masks[1]).float().mean() < 0.01
