"""Out of memory, in every form the CUDA stack raises it, is retryable; other errors are not.

On a full card PyTorch's allocator raises ``torch.OutOfMemoryError``, but cuBLAS and cuDNN report their own
failed allocations as RuntimeErrors with their status names. Each must take the retry path, not fail the job
for good with a library's status code as its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from imagen.errors import FatalGenerationError, RetryableGenerationError, is_out_of_memory
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.loras import lora_errors
from imagen.generation.runner import classify_failure
from tests.engine_fixtures import ProgressLog, engine_settings, fixtures_registry, task

GPU_OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_INITIALIZED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
]
NOT_OUT_OF_MEMORY = [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x320 and 640x320)"),
    ValueError("Target modules {'to_q'} not found in the base model"),
    KeyError("lora_unet_down_blocks_0"),
]


@pytest.mark.parametrize("exc", GPU_OUT_OF_MEMORY, ids=lambda e: str(e)[:40])
def test_every_gpu_allocation_failure_is_retryable_out_of_memory(exc: BaseException) -> None:
    assert is_out_of_memory(exc)
    assert classify_failure(exc) == (True, "CUDA out of memory")


def test_host_memory_is_retryable_too_and_says_so() -> None:
    assert classify_failure(MemoryError()) == (True, "out of memory")


@pytest.mark.parametrize("exc", NOT_OUT_OF_MEMORY, ids=lambda e: str(e)[:40])
def test_other_errors_fail_for_good_with_their_message(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)
    retryable, message = classify_failure(exc)
    assert not retryable and type(exc).__name__ in message


def test_a_lora_that_meets_a_full_card_is_retried_and_a_mismatched_one_fails() -> None:
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ALLOC_FAILED"), lora_errors("LoRA 'x' does not fit"):
        raise GPU_OUT_OF_MEMORY[1]
    with pytest.raises(FatalGenerationError, match="LoRA 'x' does not fit: mat1"), lora_errors("LoRA 'x' does not fit"):
        raise NOT_OUT_OF_MEMORY[0]


def test_the_engine_turns_a_cublas_allocation_failure_into_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, warm_up_steps=0))
    image = engine.generate(task(), ProgressLog())[0].image

    def full_card(*args: object, **kwargs: object) -> None:
        raise GPU_OUT_OF_MEMORY[1]

    encoder = engine._models["sdxl-base"].encoder
    monkeypatch.setattr(encoder, "encode", full_card)
    with pytest.raises(RetryableGenerationError, match="CUDA out of memory"):
        engine.generate(task(), ProgressLog())
    monkeypatch.undo()
    # The next attempt runs as if nothing happened.
    assert engine.generate(task(), ProgressLog())[0].image.tobytes() == image.tobytes()


def test_an_out_of_memory_while_the_vae_upcasts_leaves_the_whole_vae_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 (like fp16 on a GPU): the VAE is cast to fp32 to decode; on a CPU it then stays fp32, until an
    # img2img job's encoder (diffusers) casts it back to the pipeline's dtype, as done here by hand.
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, warm_up_steps=0, dtype="bfloat16"))
    image = engine.generate(task(), ProgressLog())[0].image
    vae = engine._models["sdxl-base"].pipe.vae
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    vae.to(dtype=torch.bfloat16)
    conv_out = vae.decoder.conv_out  # cast after most of the VAE: the card fills up half way through
    cast = conv_out._apply

    def full_card_on_upcast(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32:
            raise GPU_OUT_OF_MEMORY[0]
        return cast(fn, *args, **kwargs)

    monkeypatch.setattr(conv_out, "_apply", full_card_on_upcast)
    with pytest.raises(RetryableGenerationError, match="CUDA out of memory"):
        engine.generate(task(), ProgressLog())
    monkeypatch.undo()
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert engine.generate(task(), ProgressLog())[0].image.tobytes() == image.tobytes()
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
