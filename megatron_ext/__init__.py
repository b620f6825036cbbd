"""Extensions of megatron-core: model specs, CPU backend, trainer loop, checkpoints and manifests.

Importing this package is cheap; megatron-core is imported by the submodules that need it, without
importing torch's compiler (:mod:`megatron_ext.lazy_compile`).
"""

from megatron_ext.lazy_compile import install_before_megatron_core

install_before_megatron_core()
