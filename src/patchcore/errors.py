"""The errors every face of patchcore reports as one line (``patchcore: error: ...``), each naming
the file and the cause. Here, apart from the modules that raise them, so that catching them needs
no PyTorch (the exported-model runtime has none)."""


class BadInputError(ValueError):
    """An input file or folder that cannot be used; the message names it and says why."""


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message names it and says why."""


class WeightsError(RuntimeError):
    """The backbone's pretrained weights could not be found or read."""


class ClusterError(RuntimeError):
    """Ray failed (``--ray``): the cluster could not be started or joined, or it lost the work."""


def is_missing_pytorch(error: ModuleNotFoundError) -> bool:
    """Whether an import failed for want of PyTorch (torch or torchvision): where only the
    runtime is installed, the caller then says which install has it."""
    return (error.name or "").split(".")[0] in ("torch", "torchvision")
