"""GPU timing shared by the PyTorch comparison scripts, the same method as mmkd's
`selftest::time_gpu`: samples of back-to-back calls lasting about 1 ms (at most 64) between one
pair of CUDA events, divided by the calls. A pair of events around a single call would also time
the host's launch, since the GPU sits idle until the call arrives."""

import math

SAMPLE_MS = 1.0
MAX_REPS = 64


def sample_ms(fn, reps):
    """GPU milliseconds per call of `fn` over `reps` calls queued between one pair of events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def time_calls(fn, warmup, samples):
    """(milliseconds per call of each sample, calls per sample) after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    one = sample_ms(fn, 1)
    reps = min(max(math.ceil(SAMPLE_MS / max(one, 1e-6)), 1), MAX_REPS)
    return [sample_ms(fn, reps) for _ in range(max(samples, 1))], reps
