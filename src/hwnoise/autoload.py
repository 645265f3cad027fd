"""Import to switch operator-level noise on for this process from HWNOISE_* environment variables.

For verl: ``VERL_USE_EXTERNAL_MODULES=hwnoise.autoload``; for Ray: put the variables in
``runtime_env={"env_vars": {...}}`` and import this module in the worker. When HWNOISE_OPS /
HWNOISE_ERROR (or any other HWNOISE_* noise variable) are set, the import switches
``hwnoise.noisy_ops(...)`` on for the whole process: the importing thread, every thread started
afterwards, and any other thread at its first module call (an asyncio loop thread of a Ray async
actor included; see ``hwnoise.inject.env``). When none is set it does nothing. Malformed values
raise at import: the worker refuses to start rather than run clean.
"""

from .inject.env import enable_from_env

MODE = enable_from_env()
