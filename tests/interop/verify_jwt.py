"""Verifies pg_apikeys tokens with PyJWT, an implementation independent of the one that signed
them, using only what an outside service has: the JWK set from apikeys.jwks() and, for HS256,
the JWK from apikeys.export_signing_key(). Reads JSON on stdin, prints a JSON report, and exits
non-zero if any genuine token fails or any tampered token passes."""

import base64
import json
import sys

import os

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt import PyJWK, PyJWKSet


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["permissions"] = {"*": ["*"]}
    return ".".join([header, b64(json.dumps(claims).encode()), signature])


def key_for(alg: str, token: str, jwks: PyJWKSet, hs256: dict):
    kid = jwt.get_unverified_header(token)["kid"]
    if alg == "HS256":
        assert kid == hs256["kid"], (kid, hs256["kid"])
        return PyJWK(hs256).key
    return next(k for k in jwks.keys if k.key_id == kid).key


def main() -> int:
    data = json.load(sys.stdin)
    jwks = PyJWKSet.from_dict(data["jwks"])
    report, ok = {}, True
    for item in data["tokens"]:
        alg, token = item["alg"], item["token"]
        key = key_for(alg, token, jwks, data["hs256"])
        result = {"verified": False, "tampered_rejected": False, "wrong_key_rejected": False}
        try:
            claims = jwt.decode(token, key, algorithms=[alg], options={"require": ["exp", "iat"]})
            result["verified"] = claims["exp"] * 1000 <= claims["exp_ms"] < (claims["exp"] + 1) * 1000
            result["claims"] = claims
        except jwt.InvalidTokenError as e:
            result["error"] = repr(e)
        try:
            jwt.decode(tamper(token), key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            result["tampered_rejected"] = True
        # A fresh key of the same algorithm must not verify it.
        wrong = {
            "HS256": lambda: os.urandom(32),
            "ES256": lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
            "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
        }[alg]()
        try:
            jwt.decode(token, wrong, algorithms=[alg])
        except jwt.InvalidSignatureError:
            result["wrong_key_rejected"] = True
        ok = ok and all(result[k] for k in ("verified", "tampered_rejected", "wrong_key_rejected"))
        report[alg] = result
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
