"""The inspection record: every decision kept and traceable (``recorder``, ``writer``,
``store``), reviewed by people, read back as files (``export``), fed back into the model, and
watched for drift (``drift``). Torch-free: the server and ``predict`` share it."""
