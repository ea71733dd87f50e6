"""The attacks privdiff runs, by name, with one line each (listed without importing torch)."""

ATTACKS: dict[str, str] = {
    "loss": "loss threshold: mean ε-prediction error over t ∈ {50, 100, 200, 300} and 4 noise draws",
    "secmi": "SecMI_stat: t-error after deterministic DDIM inversion (t_sec = 100, k = 10)",
    "pia": "PIA: proximal initialisation, ℓ4 error at t = 200",
    "pian": "PIAN: PIA with the initial noise normalised",
    "proxy": "PrivateLoRA's learned attacker h′: MLP on the squared-error map, trained on the auxiliary roles",
    "proxy-loss": "learned attacker h′ on the log loss at a Goldilocks t (t ∈ {50, 100, 200, 300}), trained on the auxiliary roles",
}
