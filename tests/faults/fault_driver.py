"""A process for tests/faults to kill: saves checkpoints or writes run files, with TUNEFLOW_FAULT set
at a chosen step so that it dies by SIGKILL at a named point, as a power cut or the OOM killer would.

  python fault_driver.py ckpt FOLDER PLAN_JSON    PLAN: [[stage, epoch, val_accuracy, fault], ...]
  python fault_driver.py hold RUN_FOLDER          lock a run folder, print "locked", sleep
  python fault_driver.py metrics RUN_FOLDER FAULT append rows, the last one with FAULT set
  python fault_driver.py json RUN_FOLDER FAULT    rewrite run.json with FAULT set
"""
import json
import os
import sys
import time


def tiny_model():
    """Two Dense layers and an Adam optimizer with slot variables: a checkpoint like a real one."""
    import keras
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                              keras.layers.Dense(2, name="out")])
    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    return model, opt


def fill(model, value: float) -> None:
    """Every weight = ``value``: a restored model says which save it came from."""
    import numpy as np
    for w in model.weights:
        w.assign(np.full(w.shape, value, "float32"))


def tag(stage: int, epoch: int) -> float:
    return 100.0 * stage + epoch


def main(argv):
    mode = argv[0]
    if mode == "ckpt":
        from tuneflow.runs.checkpoints import Checkpoints
        folder, plan = argv[1], json.loads(argv[2])
        model, opt = tiny_model()
        ckpts = Checkpoints(folder, model, opt)
        for stage, epoch, acc, fault in plan:
            fill(model, tag(stage, epoch))
            if fault:
                os.environ["TUNEFLOW_FAULT"] = fault
            ckpts.save(stage, epoch, {"val_accuracy": acc, "val_loss": 1.0 - acc})
            os.environ.pop("TUNEFLOW_FAULT", None)
        print("finished without a kill")
        return 0
    from tuneflow.runs.folder import RunDir
    if mode == "hold":
        run = RunDir.open(argv[1], "x", resume=os.path.exists(argv[1]))
        print("locked", flush=True)
        time.sleep(600)
        run.close()
        return 0
    run = RunDir.open(argv[1], "x", resume=True)
    if mode == "metrics":
        run.append_metrics({"stage": 0, "epoch": 2, "val_accuracy": 0.5})
        os.environ["TUNEFLOW_FAULT"] = argv[2]
        run.append_metrics({"stage": 0, "epoch": 3, "val_accuracy": 0.75})
    elif mode == "json":
        os.environ["TUNEFLOW_FAULT"] = argv[2]
        run.status("running", epoch=99)
    print("finished without a kill")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
