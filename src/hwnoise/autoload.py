"""Import to switch operator-level noise on for this process from HWNOISE_* environment variables.

For verl: ``VERL_USE_EXTERNAL_MODULES=hwnoise.autoload``; for Ray: put the variables in
``runtime_env={"env_vars": {...}}`` and import this module in the worker. When HWNOISE_OPS /
HWNOISE_ERROR (or any other HWNOISE_* noise variable) are set, the import enters
``hwnoise.noisy_ops(...)`` and never exits it (process-wide, for the importing thread); when none
is set it does nothing. Malformed values raise at import: the worker refuses to start rather than
run clean. Variables: see ``hwnoise.inject.env``.
"""

from .inject.env import enable_from_env

MODE = enable_from_env()
