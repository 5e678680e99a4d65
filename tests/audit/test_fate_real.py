"""The audit chain on the bytes the real pyfate 2.2 client sends (see gen_fate_payloads.py)."""

from __future__ import annotations

import json
import pickle
import tomllib
from collections import defaultdict

import pytest

from fedgate.audit import (
    AuditChain,
    AuditConfig,
    KeyFound,
    Malformed,
    PayloadInspector,
    PayloadLimits,
    Reject,
    ScanLimit,
    TensorFound,
)
from fedgate.audit.events import EncryptedTensorFound
from fedgate.audit.policy import policy_from_data
from fedgate.proxy.envelope import Envelope
from fedgate.proxy.protos import osx_pb2, proxy_pb2, transfer_pb2
from tests.audit.conftest import FatePayload

pytestmark = pytest.mark.interop

K_POLICY = """
[default]
key_bits = [1024, 2048]
required_features = [0, 1, 2, 3]
allow_nan = false
[[default.features]]
min = 0.0
max = 1.0
"""

# What the policy above says about each object FATE sent: None = passes, else the rule that rejects it.
K_EXPECTED: dict[str, str | None] = {
    "pk_1024": None,
    "pk_2048": None,
    "pk_128": "key.size",
    "pk_2025": "key.size",
    "enc_1024": None,
    "pk_ou_1024": None,
    "enc_ou_1024": None,
    "enc_2048": None,
    "plain_ok": None,
    "plain_range": "tensor.range",
    "plain_nan": "tensor.nan",
    "plain_empty": "tensor.empty",
    "plain_norows": "tensor.empty",
    "numpy_ok": None,
    "mid_ok": None,
    "mid_range": "tensor.range",
    "big_ok": None,
    "big_range": "tensor.range",
}


def _chain(*, shadow: bool = False) -> AuditChain:
    return AuditChain(AuditConfig(shadow=shadow), policy_from_data(tomllib.loads(K_POLICY)))


def _verdicts(chain: AuditChain, payloads: list[FatePayload]) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = defaultdict(list)
    for i, p in enumerate(payloads):
        result = chain.inspect(p.envelope, "out", now=1000.0 + i)
        verdict = result.verdict if not shadow_of(result) else result.shadow
        out[p.object].append(verdict.rule if isinstance(verdict, Reject) else None)
    return out


def shadow_of(result: object) -> bool:
    return getattr(result, "shadow", None) is not None


def test_every_object_is_judged_as_the_policy_says(fate_payloads: list[FatePayload]) -> None:
    verdicts = _verdicts(_chain(), fate_payloads)
    assert set(verdicts) == set(K_EXPECTED)
    for name, rule in K_EXPECTED.items():
        if name.startswith("big_"):
            continue
        assert verdicts[name] == [rule], name


def test_split_objects_are_inspected_across_slices(fate_payloads: list[FatePayload]) -> None:
    verdicts = _verdicts(_chain(), fate_payloads)
    # big_ok: every slice message and the split header pass
    assert len(verdicts["big_ok"]) > 2 and set(verdicts["big_ok"]) == {None}
    # big_range: the value 1e6 sits in the last row; the slice that completes the tensor is rejected,
    # and every later piece of the same object (its split header included) is rejected too
    big = verdicts["big_range"]
    first = next(i for i, v in enumerate(big) if v is not None)
    assert big[first] == "tensor.range"
    assert all(v == "object.rejected" for v in big[first + 1 :])
    assert big[-1] == "object.rejected"


def test_split_slices_out_of_order_are_reassembled(fate_payloads: list[FatePayload]) -> None:
    big = [p for p in fate_payloads if p.object == "big_range"]
    slices, header = big[:-1], big[-1]
    inspector = PayloadInspector()
    events: list[object] = []
    for p in [*reversed(slices), header]:
        events.extend(inspector.inspect(p.envelope, now=0.0).events)
    tensors = [e for e in events if isinstance(e, TensorFound)]
    assert len(tensors) == 1
    assert tensors[0].shape == (40_000, 8) and tensors[0].max == 1e6
    assert tensors[0].columns[3].max == 1e6 and tensors[0].columns[2].max is not None
    assert tensors[0].columns[2].max < 1.0
    assert not [e for e in events if isinstance(e, Malformed | ScanLimit)]
    assert inspector.open_objects == 0 and inspector.pending_bytes == 0


def test_a_split_header_before_its_slices_is_rejected(fate_payloads: list[FatePayload]) -> None:
    # FATE pushes the slice table before the header; a header first means the slices were not
    # inspected (lost, evicted or held back): reject it, and every slice that comes later
    big = [p for p in fate_payloads if p.object == "big_ok"]
    chain = _chain()
    rules = []
    for p in [big[-1], *big[:-1]]:
        verdict = chain.inspect(p.envelope, "out", now=0.0).verdict
        rules.append(verdict.rule if isinstance(verdict, Reject) else None)
    assert rules[0] == "limit.reassembly.incomplete"
    assert set(rules[1:]) == {"object.rejected"}


def test_an_evicted_object_is_not_passed_uninspected(fate_payloads: list[FatePayload]) -> None:
    big = [p for p in fate_payloads if p.object == "big_range"]
    inspector = PayloadInspector(limits=PayloadLimits(max_objects=1))
    sent = 0
    while inspector.open_objects == 0:  # (some slice messages of a partition are empty lists)
        assert not inspector.inspect(big[sent].envelope, now=0.0).events or sent == 0
        sent += 1
    # another split object opens and evicts big_range's reassembly
    other = osx_pb2.Message(
        head=b'{"content_type": "application/json", "message_id": "x__table_persistent_split__"}',
        body=b'[{"k": "%s", "v": "%s"}]' % (pickle.dumps(0).hex().encode(), pickle.dumps(b"\x80\x04").hex().encode()),
    )
    inspector.inspect(Envelope("o", "audit-gen", "t", "9999", "10000", other.SerializeToString()), now=0.0)
    limits = []
    for p in big[sent:]:
        events = inspector.inspect(p.envelope, now=0.0).events
        assert not any(isinstance(e, TensorFound) for e in events)  # nothing is walked after the eviction
        slices = (
            json.loads(osx_pb2.Message.FromString(p.envelope.payload).body) if p.content_type != "text/plain" else []
        )
        limits.append((len(slices), {e.limit for e in events if isinstance(e, ScanLimit)}))
    # every later message of the object that carries a slice is flagged as dropped, its header as incomplete
    assert all(found == {"reassembly.dropped"} for n, found in limits[:-1] if n), limits
    assert any(n for n, _ in limits[:-1])
    assert limits[-1] == (0, {"reassembly.incomplete"})


def test_keys_and_encrypted_tensors_are_found(fate_payloads: list[FatePayload]) -> None:
    inspector = PayloadInspector()
    found: dict[str, list[object]] = {}
    for p in fate_payloads:
        found[p.object] = list(inspector.inspect(p.envelope, now=0.0).events)
    for bits in (1024, 2048, 128, 2025):
        keys = [e for e in found[f"pk_{bits}"] if isinstance(e, KeyFound)]
        assert [(k.scheme, k.bits) for k in keys] == [("paillier", bits)]
    assert [(k.scheme, k.bits) for k in found["pk_ou_1024"] if isinstance(k, KeyFound)] == [("ou", 1024)]
    assert [e.key_bits for e in found["enc_ou_1024"] if isinstance(e, EncryptedTensorFound)] == [(1024,)]
    for bits in (1024, 2048):
        enc = [e for e in found[f"enc_{bits}"] if isinstance(e, EncryptedTensorFound)]
        assert len(enc) == 1 and enc[0].key_bits == (bits,)
        assert enc[0].cls.endswith("PHETensor")


def test_shadow_mode_rejects_nothing_but_reports(fate_payloads: list[FatePayload]) -> None:
    chain = _chain(shadow=True)
    would: dict[str, str] = {}
    for i, p in enumerate(fate_payloads):
        result = chain.inspect(p.envelope, "out", now=float(i))
        assert not isinstance(result.verdict, Reject)
        if result.shadow is not None:
            would.setdefault(p.object, result.shadow.rule)
    assert would == {k: v for k, v in K_EXPECTED.items() if v is not None}


def _rollsite_packets(env: Envelope, name: str, *, chunk: int = 100_000) -> list[Envelope]:
    """The FATE object of an OSX message re-framed as EggRoll rollsite packets (bin batches)."""
    body = osx_pb2.Message.FromString(env.payload).body
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        key = i.to_bytes(4, "big")
        batch = bytes.fromhex("46709394") + bytes.fromhex("00000001") + bytes(8)
        batch += len(key).to_bytes(4, "big") + key + len(piece).to_bytes(4, "big") + piece
        rs = transfer_pb2.RollSiteHeader(
            rollSiteSessionId=env.session_id,
            name=name,
            tag="t0",
            srcPartyId=env.src_party,
            dstPartyId=env.dst_party,
            dataType="object",
            stage="finish_partition" if i == len(pieces) - 1 else "",
        )
        packet = proxy_pb2.Packet(
            header=proxy_pb2.Metadata(seq=i + 1, ext=rs.SerializeToString()), body=proxy_pb2.Data(value=batch)
        )
        out.append(
            Envelope(
                message_id=f"{env.message_id}-{i}",
                session_id=env.session_id,
                topic=env.topic,
                src_party=env.src_party,
                dst_party=env.dst_party,
                payload=packet.SerializeToString(),
                protocol="rollsite",
            )
        )
    return out


def test_real_rollsite_client_chunks(rollsite_packets: list[tuple[str, Envelope]]) -> None:
    chain = _chain()
    verdicts: dict[str, list[str | None]] = defaultdict(list)
    for name, env in rollsite_packets:
        verdict = chain.inspect(env, "in", now=0.0).verdict
        verdicts[name].append(verdict.rule if isinstance(verdict, Reject) else None)
    assert len(verdicts["mid_range"]) > 1  # the 576 kB object really travelled in several packets
    for name, rules in verdicts.items():
        expected = K_EXPECTED[name]
        if expected is None:
            assert set(rules) == {None}, (name, rules)
        else:
            # the chunk that completes the offending value is rejected, and every later one of the object
            first = next(i for i, r in enumerate(rules) if r is not None)
            assert rules[first] == expected and set(rules[first + 1 :]) <= {"object.rejected"}, (name, rules)


@pytest.mark.parametrize("chunk", [100_000, 997])
def test_rollsite_chunks_carry_the_same_verdicts(fate_payloads: list[FatePayload], chunk: int) -> None:
    chain = _chain()
    for p in fate_payloads:
        if p.content_type != "text/plain" or p.object.startswith("big_"):
            continue
        rules = []
        for env in _rollsite_packets(p.envelope, p.object, chunk=chunk):
            verdict = chain.inspect(env, "in", now=0.0).verdict
            rules.append(verdict.rule if isinstance(verdict, Reject) else None)
        expected = K_EXPECTED[p.object]
        if expected is None:
            assert set(rules) == {None}, p.object
        else:
            assert expected in rules, (p.object, rules)
