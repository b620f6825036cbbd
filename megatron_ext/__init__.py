"""Extensions of megatron-core: model specs, CPU backend, trainer loop, checkpoints and manifests.

Importing this package is cheap; megatron-core is imported by the submodules that need it.
"""
