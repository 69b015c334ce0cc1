"""The example application around the library: the generation scripts' engine (``generation``), their
settings (``settings``: the library's plus ``--lvsa`` and ``--flashinfer``) and each model family's small
example pipelines (``models``). ``import lvsa`` never imports it."""
