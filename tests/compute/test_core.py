"""Pure core: key generation, raw arithmetic, limb buffers, FATE-style fixed-point encoding."""

from __future__ import annotations

import math
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.compute.djn import DjnTable, RandomnessPool
from fedgate.compute.encoding import Encoded, FixedPointCoder
from fedgate.compute.limbs import LimbBuffer, from_limbs, limbs_for_bits, to_limbs
from fedgate.compute.paillier import (
    SecretKey,
    add_raw,
    decrypt_raw,
    encrypt_raw,
    generate_keypair,
    mul_scalar_raw,
    random_rn,
    random_rn_crt,
)
from fedgate.errors import InvalidRequestError

from .conftest import KeyPair


def test_keygen_parameters(keys1024: KeyPair) -> None:
    pk, sk = keys1024
    assert pk.bits == 1024 and pk.n == sk.p * sk.q
    assert sk.p < sk.q and sk.p.bit_length() == sk.q.bit_length() == 512
    assert (sk.q - sk.p).bit_length() > 512 - 100
    assert math.gcd(pk.n, (sk.p - 1) * (sk.q - 1)) == 1
    assert pk.plain_width == 32 and pk.cipher_width == 64


def test_keygen_2048(keys2048: KeyPair) -> None:
    pk, sk = keys2048
    assert pk.bits == 2048 and pk.cipher_width == 128
    assert decrypt_raw(sk, encrypt_raw(pk, 12345, random_rn(pk))) == 12345


@pytest.mark.parametrize("bits", [512, 1023, 1025])
def test_keygen_refuses_weak_or_odd_sizes(bits: int) -> None:
    with pytest.raises(InvalidRequestError):
        generate_keypair(bits)


def test_secret_key_never_prints_factors(keys1024: KeyPair) -> None:
    pk, sk = keys1024
    for text in (repr(sk), str(sk), f"{sk}"):
        assert str(sk.p) not in text and format(sk.p, "x") not in text
        assert pk.key_id in text


def test_raw_arithmetic(keys1024: KeyPair) -> None:
    pk, sk = keys1024
    a, b = secrets.randbelow(pk.n), secrets.randbelow(pk.n)
    ca, cb = encrypt_raw(pk, a, random_rn(pk)), encrypt_raw(pk, b, random_rn_crt(sk))
    assert decrypt_raw(sk, ca) == a and decrypt_raw(sk, cb) == b
    assert decrypt_raw(sk, add_raw(pk, ca, cb)) == (a + b) % pk.n
    assert decrypt_raw(sk, mul_scalar_raw(pk, ca, 3)) == 3 * a % pk.n
    assert decrypt_raw(sk, mul_scalar_raw(pk, ca, pk.n - 3)) == -3 * a % pk.n
    with pytest.raises(InvalidRequestError):
        encrypt_raw(pk, pk.n, None)


def test_crt_rn_is_an_nth_residue(keys1024: KeyPair) -> None:
    pk, sk = keys1024
    rn = random_rn_crt(sk)
    assert decrypt_raw(sk, rn) == 0 and 0 < rn < pk.n2


def test_djn_table_matches_powmod_and_is_fresh(keys1024: KeyPair) -> None:
    pk, sk = keys1024
    table = DjnTable(pk, window=5)
    a = secrets.randbits(table.exponent_bits)
    assert table.power(a) == pow(int(table.hs), a, pk.n2)
    values = {int(table.random_rn()) for _ in range(50)}
    assert len(values) == 50
    assert all(decrypt_raw(sk, v) == 0 for v in list(values)[:5])  # n-th residues encrypt 0


@pytest.mark.parametrize("window", [5, 7, 12])
def test_djn_batch_walk_matches_powmod_and_is_fresh(window: int, keys1024: KeyPair) -> None:
    pk, sk = keys1024
    table = DjnTable(pk, window=window)
    top = (1 << table.exponent_bits) - 1
    exps = [0, 1, top, 1 << (table.exponent_bits - 1)] + [secrets.randbits(table.exponent_bits) for _ in range(6)]
    assert table.powers(exps) == [pow(int(table.hs), a, pk.n2) for a in exps]
    with pytest.raises(ValueError):
        table.powers([top + 1])
    with pytest.raises(ValueError):
        table.powers([-1])
    values = table.random_rns(300)
    assert len({int(v) for v in values}) == 300 and table.random_rns(0) == []
    assert all(decrypt_raw(sk, v) == 0 for v in values[:5])  # n-th residues encrypt 0


def test_djn_batch_digits_are_exactly_the_exponent_length(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgate.compute import djn

    monkeypatch.setattr(secrets, "token_bytes", lambda k: b"\xff" * k)  # all-ones words: the largest a
    rows = djn._digit_rows(None, 3, 12, 512)
    assert len(rows) == 43 and all(d == 4095 for row in rows[:-1] for d in row) and rows[-1] == [255] * 3
    a = sum(d << (12 * i) for i, d in enumerate(r[0] for r in rows))
    assert a == (1 << 512) - 1
    assert djn._digit_rows([a, 5], 2, 12, 512) == [[r[0], 0 if i else 5] for i, r in enumerate(rows)]


def test_randomness_pool_hands_each_value_out_once() -> None:
    pool = RandomnessPool(10, low_water=0.5)
    counter = iter(range(1000))
    assert pool.fill(lambda: next(counter)) == 10
    first = pool.take(4)
    assert pool.deficit() == 0 and len(pool) == 6
    second = pool.take(100)
    assert len(second) == 6 and not set(first) & set(second)
    assert pool.take(1) == [] and pool.deficit() == 10 and pool.served == 10


@given(st.lists(st.integers(min_value=0, max_value=2**96 - 1), max_size=20))
@settings(max_examples=50, deadline=None)
def test_limbs_roundtrip(values: list[int]) -> None:
    buf = to_limbs(values, 3)
    assert buf.count == len(values) and len(buf.data) == 12 * len(values)
    assert from_limbs(buf) == values
    if values:
        assert buf.element(len(values) - 1) == values[-1]
        assert from_limbs(buf.slice(1, len(values))) == values[1:]


def test_limbs_are_little_endian_and_validated() -> None:
    assert to_limbs([0x0102030405], 2).data == bytes([5, 4, 3, 2, 1, 0, 0, 0])
    assert limbs_for_bits(1024) == 32 and limbs_for_bits(1025) == 33
    with pytest.raises(InvalidRequestError):
        to_limbs([2**64], 2)
    with pytest.raises(InvalidRequestError):
        to_limbs([-1], 2)
    with pytest.raises(InvalidRequestError):
        LimbBuffer(b"\0" * 5, 1)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
@settings(max_examples=200, deadline=None)
def test_fixed_point_float_roundtrip_is_exact(value: float) -> None:
    coder = FixedPointCoder((1 << 1023) + 12345)
    assert coder.decode_f64(coder.encode_f64(value)) == value


def test_fixed_point_matches_fates_examples() -> None:
    n = (1 << 1023) + 12345
    coder = FixedPointCoder(n)
    assert coder.encode_f64(1.5) == Encoded(6755399441055744, -13)
    assert coder.encode_f64(-2.25) == Encoded(n - 10133099161583616, -13)
    assert coder.encode_i64(-7) == Encoded(n - 7, 0) and coder.decode_i64(Encoded(n - 7, 0)) == -7
    with pytest.raises(InvalidRequestError):
        coder.from_residue(n)  # not a residue: corrupted
    assert coder.from_residue(n // 2 + 1) == -(n // 2)  # odd n: the signed ranges meet, no gap
    with pytest.raises(InvalidRequestError):
        coder.encode_f64(math.inf)


def test_packing_roundtrip() -> None:
    coder = FixedPointCoder((1 << 1023) + 12345)
    values = [0.5, 0.25, 1.0, 3.75, 0.0, 2.5, 1.125]
    packed = coder.pack_floats(values, offset_bit=40, pack_num=3, precision=20)
    assert len(packed) == 3
    back = FixedPointCoder.unpack_floats(packed, offset_bit=40, pack_num=3, precision=20, total=len(values))
    assert back == values
    with pytest.raises(InvalidRequestError):
        coder.pack_floats([-1.0], offset_bit=40, pack_num=3, precision=20)


def test_secret_key_rejects_equal_primes() -> None:
    with pytest.raises(InvalidRequestError):
        SecretKey(101, 101)
