"""RWKV-LM's "magic prime": the slot count p of the deterministic stream order (see samplers.StreamDataset).

p is the largest prime <= tokens // ctx_len - 1 with p % 3 == 2 (so x -> x^3 permutes the residues mod p); RWKV-LM's
trainer also wants p / slots > 0.9 so at most a tenth of the data goes unseen per epoch.
"""

from __future__ import annotations


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (far beyond any token count)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(num_tokens: int, ctx_len: int) -> int | None:
    """Largest prime p <= num_tokens // ctx_len - 1 with p % 3 == 2, or None if there is none."""
    p = num_tokens // ctx_len - 1
    while p >= 2:
        if p % 3 == 2 and is_prime(p):
            return p
        p -= 1
    return None


def magic_prime_info(num_tokens: int, ctx_len: int) -> dict:
    """What the metadata JSON records for one ctx_len; magic_prime is None when p / slots <= 0.9 (RWKV-LM's rule)."""
    slots = num_tokens // ctx_len
    p = magic_prime(num_tokens, ctx_len)
    ok = p is not None and p / slots > 0.9
    return {"slots": slots, "magic_prime": p if ok else None, "largest_prime": p,
            "coverage": round(p / slots, 6) if p else 0.0}
