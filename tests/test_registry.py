"""Promotion on a real (sqlite) MLflow registry: `champion` moves only to a strictly better OOD accuracy,
both sides of every comparison are tagged, `challenger` is the runner-up; an unreachable server fails fast."""
import pytest

from iga.errors import ConfigError


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from tasks import tracking

    mlflow = tracking.mlflow_module()
    client = mlflow.MlflowClient()
    client.create_registered_model("student")
    return client


def _version(client, ood, id_acc=0.5):
    v = client.create_model_version("student", source="file:///nowhere")
    client.set_model_version_tag("student", v.version, "ood_accuracy", str(ood))
    client.set_model_version_tag("student", v.version, "id_accuracy", str(id_acc))
    return client.get_model_version("student", v.version)


def test_champion_moves_only_on_a_better_ood_accuracy(client):
    from tasks.registry import promote

    first, second = _version(client, 0.40), _version(client, 0.30)
    assert promote(client, "student", [first, second]) == {"champion": first.version, "challenger": second.version}
    assert client.get_model_version("student", first.version).tags["promotion"] == "first champion"

    worse = _version(client, 0.35)
    assert promote(client, "student", [worse])["champion"] == first.version
    assert "lost to champion" in client.get_model_version("student", worse.version).tags["promotion"]
    assert f"defended_against_v{worse.version}" in client.get_model_version("student", first.version).tags
    assert client.get_model_version_by_alias("student", "challenger").version == worse.version

    tie = _version(client, 0.40, id_acc=0.5)  # a tie keeps the incumbent
    assert promote(client, "student", [tie])["champion"] == first.version

    better = _version(client, 0.55)
    assert promote(client, "student", [better]) == {"champion": better.version, "challenger": first.version}
    assert "beat champion" in client.get_model_version("student", better.version).tags["promotion"]
    assert "dethroned" in client.get_model_version("student", first.version).tags["promotion"]
    assert client.get_model_version_by_alias("student", "champion").version == better.version


def test_an_unreachable_tracking_server_fails_fast(monkeypatch):
    from tasks import tracking
    from servers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConfigError, match="unreachable"):
        tracking.check_reachable()  # before any work: MLflow's own client would retry for ~4 minutes
