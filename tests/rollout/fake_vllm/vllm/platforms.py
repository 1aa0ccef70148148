"""``vllm.platforms.current_platform`` of the stand-in: a GPU (sleep mode available)."""


class _GPU:
    def is_cpu(self) -> bool:
        return False

    def is_sleep_mode_available(self) -> bool:
        return True


current_platform = _GPU()
