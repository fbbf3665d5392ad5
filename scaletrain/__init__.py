"""scaletrain: diffusion-model training that scales out (docs/ARCHITECTURE.md)."""

import logging


class _KnownNoise(logging.Filter):
    """Drops the few log lines torchao's presence makes at import on a CPU build of torch.

    torchao (``engine.precision: fp8``, engines/fp8.py) is imported by diffusers at diffusers' own
    import whenever it is installed, so every process would print: one warning per torchao CUDA
    extension that cannot load (its MX and CUTLASS kernels; float8 training does not use them),
    torch's deprecation of one of torchao's pytree registrations, and diffusers' note that it cannot
    import torchao's quantized-tensor classes (used to load torchao-quantized checkpoints, which
    scaletrain never reads). Exactly those messages are filtered, on their own loggers; any other
    line from these loggers still prints."""

    def __init__(self, *starts: str, contains: str = "") -> None:
        super().__init__()
        self.starts, self.contains = starts, contains

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if self.contains:
            return self.contains not in msg
        return not msg.startswith(self.starts)


logging.getLogger("torchao").addFilter(_KnownNoise("Failed to load", "Skipping import of cpp extensions"))
logging.getLogger("torch.utils._pytree").addFilter(
    _KnownNoise(contains="is an Enum subclass and is now natively supported by torch.compile"))
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    _KnownNoise("Unable to import `torchao` Tensor objects"))
