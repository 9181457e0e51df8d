"""Stand-in for ``tensorrt_llm._torch.utils`` (tests only)."""


def get_device_uuid(device_index: int) -> str:
    """A fake, stable UUID per device index (the real one asks the driver)."""
    return f"GPU-stub-{int(device_index)}"
