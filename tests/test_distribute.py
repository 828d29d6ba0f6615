"""tuneflow.training.distribute: the precision chosen for the hardware, and MultiWorkerMirroredStrategy
for real: two worker processes on 127.0.0.1, each on its own port."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_image_folder, random_lite0_weights
from tuneflow.training.distribute import choose_precision



def test_an_explicit_precision_is_kept():
    for p in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert choose_precision(p) == p


def test_precision_auto_follows_the_cpu(monkeypatch):
    """``auto`` is bfloat16 exactly where the CPU computes it (on a machine without a GPU), both ways
    on any CPU (``TUNEFLOW_CPU_BF16`` stands in for the hardware)."""
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("auto follows the GPU here")
    monkeypatch.setenv("TUNEFLOW_CPU_BF16", "1")
    assert choose_precision("auto") == "mixed_bfloat16"
    monkeypatch.setenv("TUNEFLOW_CPU_BF16", "0")
    assert choose_precision("auto") == "float32"
    monkeypatch.delenv("TUNEFLOW_CPU_BF16")
    flags = open("/proc/cpuinfo").read()
    assert (choose_precision("auto") == "mixed_bfloat16") == ("avx512_bf16" in flags or "amx_bf16" in flags)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _workers(cmd, ports, tmp_path, timeout=420):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    scratch = tmp_path / "tmp"  # the workers' own temporary folder: tests running beside this one have theirs
    scratch.mkdir(exist_ok=True)
    try:
        for i in range(len(ports)):
            env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch)}
            log = open(tmp_path / f"worker{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:  # bounded in time, always stopped
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()
    return codes, [(tmp_path / f"worker{i}.log").read_text() for i in range(len(ports))]


WORKER = textwrap.dedent("""
    import json, os, sys, numpy as np
    from tuneflow import finetune
    data, out, dump, weights = sys.argv[1:5]
    ov = dict(input_size=32, backbone="efficientnet_lite0", weights=weights, batch_size=4, precision="float32", strategy="multiworker",
              head__epochs=2, finetune__epochs=2, head__patience=0, finetune__patience=0,
              head_solver="sgd")  # the head trained by the optimizer too: collectives in both stages
    res = finetune("large_similar", data, out, overrides=ov, verbose=0)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(f"{dump}/weights{index}.npz", *[np.asarray(w) for w in res.model.weights])
""")


def _worker_command(tmp_path, script_text):
    """(data folder, run folder, command) for a worker script taking DATA OUT DUMP_DIR."""
    data = make_image_folder(tmp_path / "d", per_class=10)
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(script_text)
    return data, out, [sys.executable, str(script), str(data), str(out), str(tmp_path), random_lite0_weights()]


def _assert_same_weights(tmp_path):
    w0, w1 = np.load(tmp_path / "weights0.npz"), np.load(tmp_path / "weights1.npz")
    assert len(w0.files) == len(w1.files) > 100
    for k in w0.files:
        np.testing.assert_allclose(w0[k], w1[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_two_workers_train_one_run_in_sync_and_only_the_chief_writes_it(tmp_path):
    data, out, cmd = _worker_command(tmp_path, WORKER)
    codes, logs = _workers(cmd, _free_ports(2), tmp_path)
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] in ("MultiWorkerMirroredStrategy", "CollectiveAllReduceStrategy")  # same class
    assert report["replicas"] == 2 and report["global_batch"] == 8
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 4  # 2 + 2 epochs, written once (by the chief)
    # The other worker left nothing behind: its scratch run folder (in the workers' TMPDIR, which
    # no other test shares) is removed.
    assert not list((tmp_path / "tmp").glob("tuneflow-worker*")), list((tmp_path / "tmp").iterdir())
    # Gradients were all-reduced: both workers end with the same weights (BN moving statistics
    # differ only by float rounding of their all-reduce).
    _assert_same_weights(tmp_path)
    # The chief's saved model reproduces the reported validation accuracy on one CPU.
    import keras

    from tuneflow.data import load_data
    model = keras.saving.load_model(out / "model.keras")
    b = load_data(data, 32)
    acc = float(np.mean(model.predict(b.val.x.astype("float32"), verbose=0).argmax(1) == b.val.y))
    assert acc == pytest.approx(report["val_accuracy"], abs=1e-6)


@pytest.mark.parametrize("tf_config, said", [
    (None, "strategy=multiworker needs TF_CONFIG"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG's \"cluster\" must map job names"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "lists of host:port"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}', "TF_CONFIG's \"task\""),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "chief", "index": 0}}', "one of the cluster's jobs (worker)"),
])
def test_a_bad_tf_config_is_one_line_through_the_cli(tmp_path, tf_config, said):
    """Every way TF_CONFIG can be wrong is a one-line error saying what is wrong and how to set it."""
    data = make_image_folder(tmp_path / "d", per_class=4)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    exe = str(Path(sys.executable).parent / "tuneflow")
    r = subprocess.run([exe, "finetune", "small_similar", "--data", str(data), "--out", str(tmp_path / "r"),
                        "--set", "strategy=multiworker"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tuneflow: error: ") and said in last and "TF_CONFIG='" in last
    assert not (tmp_path / "r").exists()


RESUMING_WORKER = textwrap.dedent("""
    import json, logging, os, sys, numpy as np
    import tuneflow.training.stages as train
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from tuneflow import finetune
    data, out, dump, weights, mode = sys.argv[1:6]
    ov = dict(input_size=32, backbone="efficientnet_lite0", weights=weights, batch_size=4, precision="float32", strategy="multiworker",
              head__epochs=1, finetune__epochs=3, head__patience=0, finetune__patience=0)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    if mode == "crash":  # both workers stop after fine-tuning epoch 1, as a preempted job would
        original = train.EpochHook.on_epoch_end
        def crash(self, epoch, logs=None):
            original(self, epoch, logs)
            if self.stage_index == 1 and epoch + 1 == 1:
                os._exit(17)
        train.EpochHook.on_epoch_end = crash
    res = finetune("large_similar", data, out, overrides=ov, verbose=0, resume=(mode == "resume"))
    np.savez(f"{dump}/weights{index}.npz", *[np.asarray(w) for w in res.model.weights])
""")


@pytest.mark.slow
def test_two_workers_resume_from_the_chiefs_checkpoints(tmp_path):
    _, out, cmd = _worker_command(tmp_path, RESUMING_WORKER)
    codes, logs = _workers(cmd + ["crash"], _free_ports(2), tmp_path)
    assert codes == [17, 17], "\n\n".join(log[-3000:] for log in logs)
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["0", "1"], ["1", "1"]]
    codes, logs = _workers(cmd + ["resume"], _free_ports(2), tmp_path)
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["0", "1"], ["1", "1"], ["1", "2"], ["1", "3"]]
    assert "resuming from" in logs[0] and "resuming from" in logs[1]  # both continued, same point
    _assert_same_weights(tmp_path)


def test_the_keras_multiworker_fix_is_put_back_after_the_fit():
    """Keras's private reduce function is replaced only inside the ``with`` (a stage's fit) and only
    under MultiWorkerMirroredStrategy, and is Keras's own again afterwards, on an error too."""
    code = textwrap.dedent("""
        import tensorflow as tf
        mw = tf.distribute.MultiWorkerMirroredStrategy()  # one worker: no TF_CONFIG
        from keras.src.backend.tensorflow import trainer as t
        from tuneflow.training.distribute import multiworker_reduce_fixed
        orig = t.reduce_per_replica
        try:
            with multiworker_reduce_fixed(mw):
                assert t.reduce_per_replica is not orig
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert t.reduce_per_replica is orig
        with multiworker_reduce_fixed(tf.distribute.get_strategy()):
            assert t.reduce_per_replica is orig
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
