"""The flat public API: every exported name resolves, is documented and is listed by dir()."""

from __future__ import annotations

import inspect

import theta


def test_every_exported_name_resolves_and_is_documented() -> None:
    undocumented = []
    for name in theta.__all__:
        value = getattr(theta, name)
        if (inspect.isclass(value) or inspect.isfunction(value)) and not inspect.getdoc(value):
            undocumented.append(name)
    assert undocumented == []
    assert set(theta.__all__) <= set(dir(theta))
    assert not {"TYPE_CHECKING", "annotations", "importlib"} & set(dir(theta))


def test_the_types_a_session_hands_out_are_exported() -> None:
    assert theta.ReplicationChannel.__name__ == "ReplicationChannel"
    assert theta.AssetChannel.__name__ == "AssetChannel"
    assert theta.DiagnosticsWatch.__name__ == "DiagnosticsWatch"
    certificate = theta.generate_self_signed_certificate()
    assert isinstance(certificate, theta.SelfSignedCertificate)
