"""FATE compatibility both ways against the real ``fate_utils`` wheel, at 1024 and 2048 bits."""

from __future__ import annotations

from typing import Any

import pytest

from fedgate.compute import fate
from fedgate.compute.config import ComputeConfig
from fedgate.compute.cpu import CpuBackend
from fedgate.compute.encoding import Encoded, FixedPointCoder
from fedgate.compute.limbs import from_limbs, to_limbs
from fedgate.compute.paillier import generate_keypair
from fedgate.errors import InvalidRequestError

np = pytest.importorskip("numpy")
fp: Any = pytest.importorskip("fate_utils.paillier", reason="the fate_utils wheel is not installed")

VALUES = [1.5, -2.25, 3.0, 0.0, -1e-9, 123456.789, -7.0]


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    return CpuBackend(ComputeConfig(workers=1, djn_window=6))


def _fate_keys_from(pk_sk: Any) -> tuple[Any, Any, Any]:
    pk, sk = pk_sk
    fpk, fsk, coder = fp.PK(), fp.SK(), fp.Coder()
    fpk.__setstate__(fate.dump_public_key(pk))
    fsk.__setstate__(fate.dump_secret_key(sk))
    coder.__setstate__(fate.dump_coder(pk))
    return fpk, fsk, coder


def _cipher_vector(state: bytes) -> Any:
    vec = fp.CiphertextVector()
    vec.__setstate__(state)
    return vec


@pytest.mark.parametrize("bits", [1024, 2048])
def test_fedgate_keys_and_ciphertexts_work_in_fate(bits: int, backend: CpuBackend) -> None:
    pk, sk = generate_keypair(bits)
    fpk, fsk, fcoder = _fate_keys_from((pk, sk))
    coder = FixedPointCoder(pk.n)
    encs = coder.encode_f64_vec(VALUES)
    cts = backend.encrypt(pk, to_limbs([e.residue for e in encs], pk.plain_width), sk=sk)
    vec = _cipher_vector(fate.dump_ciphertexts(fate.FateVector(cts, tuple(e.exp for e in encs))))
    # FATE decrypts fedgate's ciphertexts ...
    assert list(fcoder.decode_f64_vec(fsk.decrypt_to_encoded(vec))) == VALUES
    # ... and evaluates on them: doubled by FATE's own add, scaled by its mul
    doubled = vec.add(fpk, vec)
    assert list(fcoder.decode_f64_vec(fsk.decrypt_to_encoded(doubled))) == [2 * v for v in VALUES]
    # fedgate reads FATE's result back and decrypts it
    back = fate.load_ciphertexts(doubled.__getstate__(), pk)
    dec = backend.decrypt(sk, back.data)
    got = [coder.decode_f64(Encoded(r, e)) for r, e in zip(from_limbs(dec), back.exps)]
    assert got == [2 * v for v in VALUES]


@pytest.mark.parametrize("bits", [1024, 2048])
def test_fate_keys_and_ciphertexts_work_in_fedgate(bits: int, backend: CpuBackend) -> None:
    fsk, fpk, fcoder = fp.keygen(bits)
    pk = fate.load_public_key(fpk.__getstate__())
    assert fate.dump_public_key(pk) == bytes(fpk.__getstate__())
    assert fate.dump_coder(pk) == bytes(fcoder.__getstate__())
    sk = fate.load_secret_key(fsk.__getstate__())
    assert fate.dump_secret_key(sk) == bytes(fsk.__getstate__()) and sk.public == pk
    vec = fpk.encrypt_encoded(fcoder.encode_f64_vec(np.array(VALUES)), True)
    ours = fate.load_ciphertexts(vec.__getstate__(), pk)  # FATE writes negatives: normalised here
    assert all(0 < c < pk.n2 for c in from_limbs(ours.data))
    # fedgate evaluates with FATE's exponent rules: x + x*3 = 4x, then FATE decrypts
    three = fate.FateVector(to_limbs([3] * len(VALUES), pk.plain_width), (0,) * len(VALUES))
    tripled = fate.mul_vectors(backend, pk, ours, three)
    total = fate.add_vectors(backend, pk, ours, tripled)
    out = fcoder.decode_f64_vec(fsk.decrypt_to_encoded(_cipher_vector(fate.dump_ciphertexts(total))))
    assert list(out) == [4 * v for v in VALUES]
    # and fedgate decrypts FATE's own ciphertexts with the imported key
    coder = FixedPointCoder(pk.n)
    dec = from_limbs(backend.decrypt(sk, ours.data))
    assert [coder.decode_f64(Encoded(r, e)) for r, e in zip(dec, ours.exps)] == VALUES


def test_mixed_exponents_align_like_fate(backend: CpuBackend) -> None:
    fsk, fpk, fcoder = fp.keygen(1024)
    pk = fate.load_public_key(fpk.__getstate__())
    a = fpk.encrypt_encoded(fcoder.encode_f64_vec(np.array([0.5, 1024.0, -3.0])), True)
    b = fpk.encrypt_encoded(fcoder.encode_f64_vec(np.array([2.0, 0.001, 1e10])), True)
    ours = fate.add_vectors(
        backend, pk, fate.load_ciphertexts(a.__getstate__(), pk), fate.load_ciphertexts(b.__getstate__(), pk)
    )
    theirs = a.add(fpk, b)
    assert ours.exps == tuple(fate.load_ciphertexts(theirs.__getstate__(), pk).exps)
    mine = fcoder.decode_f64_vec(fsk.decrypt_to_encoded(_cipher_vector(fate.dump_ciphertexts(ours))))
    assert list(mine) == list(fcoder.decode_f64_vec(fsk.decrypt_to_encoded(theirs)))


def test_plaintext_vectors_and_integers_both_ways() -> None:
    _, fpk, fcoder = fp.keygen(1024)
    pk = fate.load_public_key(fpk.__getstate__())
    pts = fcoder.encode_i64_vec(np.array([5, -6, 0, 2**40], dtype=np.int64))
    ours = fate.load_plaintexts(pts.__getstate__(), pk)
    coder = FixedPointCoder(pk.n)
    assert [coder.decode_i64(Encoded(r, e)) for r, e in zip(from_limbs(ours.data), ours.exps)] == [
        5,
        -6,
        0,
        2**40,
    ]
    vec = fp.PlaintextVector()
    vec.__setstate__(fate.dump_plaintexts(ours, pk))
    assert list(fcoder.decode_i64_vec(vec)) == [5, -6, 0, 2**40]


def test_packing_matches_fate() -> None:
    _, fpk, fcoder = fp.keygen(1024)
    pk = fate.load_public_key(fpk.__getstate__())
    values = [0.5, 0.25, 1.0, 3.75, 0.0, 2.5, 1.125]
    theirs = fate.load_plaintexts(fcoder.pack_floats(values, 40, 3, 20).__getstate__(), pk)
    ours = FixedPointCoder(pk.n).pack_floats(values, offset_bit=40, pack_num=3, precision=20)
    assert from_limbs(theirs.data) == ours


def test_bad_states_are_rejected(keys1024: Any) -> None:
    pk, _ = keys1024
    good = fate.dump_public_key(pk)
    with pytest.raises(InvalidRequestError):
        fate.load_public_key(good[:-3])
    with pytest.raises(InvalidRequestError):
        fate.load_public_key(good + b"x")
    with pytest.raises(InvalidRequestError):
        fate.load_ciphertexts(b"\xff" * 8, pk)


def test_pack_squeeze_is_bit_identical_to_fate(backend: CpuBackend) -> None:
    fsk, fpk, fcoder = fp.keygen(1024)
    pk = fate.load_public_key(fpk.__getstate__())
    values = [5, 0, 7, 123456, 9, 1, 2]
    vec = fpk.encrypt_encoded(fcoder.encode_i64_vec(np.array(values, dtype=np.int64)), True)
    theirs = vec.pack_squeeze(3, 40, fpk)
    ours = fate.pack_squeeze(backend, pk, fate.load_ciphertexts(vec.__getstate__(), pk), pack_num=3, shift_bit=40)
    assert fate.dump_ciphertexts(ours) == bytes(fate.dump_ciphertexts(fate.load_ciphertexts(theirs.__getstate__(), pk)))
    packed = from_limbs(backend.decrypt(fate.load_secret_key(fsk.__getstate__()), ours.data))
    assert packed == [(5 << 80) + (0 << 40) + 7, (123456 << 80) + (9 << 40) + 1, 2]
