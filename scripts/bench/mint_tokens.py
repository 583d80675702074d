#!/usr/bin/env python3
"""Mints HS256 customer tokens for buyers `PREFIX0..PREFIX{N-1}`, one per line.

Usage: mint_tokens.py SECRET_FILE PREFIX N OUT
"""
import base64, hashlib, hmac, json, sys, time

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

secret_file, prefix, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
secret = open(secret_file, "rb").read().strip()
header = b64(b'{"alg":"HS256","typ":"JWT"}')
iat = int(time.time())
exp = iat + 3 * 3600
with open(out, "w") as f:
    for i in range(n):
        claims = b64(json.dumps({"sub": f"{prefix}{i}", "role": "customer", "iss": "shardmall",
                                 "aud": "shardmall-api", "iat": iat, "exp": exp},
                                separators=(",", ":")).encode())
        signing = f"{header}.{claims}".encode()
        sig = b64(hmac.new(secret, signing, hashlib.sha256).digest())
        f.write(f"{header}.{claims}.{sig}\n")
