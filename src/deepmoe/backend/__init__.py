"""Platform layer: platform detection, the Ascend PJRT plugin hook, kernel/strategy selection.

Kept import-light on purpose: JAX imports `deepmoe.backend.ascend_plugin` (and therefore this
package) during its own plugin discovery, while holding a non-reentrant lock, so nothing here
may touch a JAX backend at import time. Import the submodules for the rest:
`capabilities` (select), `cli_support` (--platform, jax.distributed), `doctor`.
"""

from deepmoe.backend.capabilities import PLATFORMS, Selection, select

__all__ = ["PLATFORMS", "Selection", "select"]
