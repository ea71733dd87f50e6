"""Encrypted text-to-image inference (CKKS): a small backend interface, HE-Diffusion's method as
published ("compat" mode), and a private mode in which the server sees neither prompt nor image.

Modules (import them directly; this package imports nothing heavy):

- :mod:`privdiff.he.ckks`: CKKS parameters, client/public contexts, the ciphertext operations (TenSEAL).
- :mod:`privdiff.he.private`: private mode: packed encrypted linear layers, per-session permutations,
  the client's forward pass (norms, activations, attention softmax-and-mix on what it decrypts).
- :mod:`privdiff.he.compat`: HE-Diffusion's per-step HILL selection, COO packing and encrypted update.
- :mod:`privdiff.he.protocol`: the servers' shared parts: 4xx/503 errors, the session table (capability
  tokens, per-client limits, no eviction of active sessions), the fair scheduler with deadlines, memory release.
- :mod:`privdiff.he.serialization`: reads TenSEAL/SEAL bytes before loading them (counts, inflated sizes).
- :mod:`privdiff.he.server` / :mod:`privdiff.he.client`: the HTTP service and its client.

The HE-friendly denoiser these protocols evaluate is a model like any other, trained by DP-LDM's
stages: :mod:`privdiff.models.he_net` (torch only): only the ``he`` commands of the CLI import ``privdiff.he``.

docs/he.md has the threat model of each mode.
"""
