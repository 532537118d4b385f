"""`python train.py ...` end to end, as a user runs it: outputs, TensorBoard, resume, bad input."""

import hashlib
import json

import pytest
import torch
import yaml
from conftest import MLP, REPO, TINY, make_tiny_dataset, run_train, train_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer.data.idx import write_idx


def tiny(root, run_dir, *more):
    return [*TINY, f"dataset.root={root}", f"hydra.run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    result = run_train(*tiny(tiny_root, run_dir, *MLP, "trainer.max_epochs=3", "scheduler=step",
                                     "dataset.augment_shift=2"))
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_run_writes_checkpoints_metrics_and_tensorboard(finished_run):
    run_dir, result = finished_run
    assert "epoch 3/3" in result.stdout and "test/acc" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.9  # the tiny dataset is easy: a broken pipeline would not learn it
    assert metrics["epochs"] == 3 and metrics["global_step"] == 3 * 16
    assert 0 < metrics["seconds_since_start"] < 600 and metrics["peak_rss_mib"] > 0
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert "model:\n  _target_: trainer.models.mlp.MLP" in ckpt["config"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/f1", "test/loss",
            "test/acc", "test/f1", "epoch/time_s", "epoch/samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 49, 5))  # every log_every_n_steps
    assert [e.step for e in events.Scalars("val/acc")] == [16, 32, 48]
    assert events.Scalars("test/acc")[0].value == pytest.approx(metrics["test/acc"])
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "test/confusion_matrix_counts/text_summary" in events.Tags()["tensors"]
    assert {"inputs/train", "val/confusion_matrix", "test/confusion_matrix"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("val/confusion_matrix")] == [16, 32, 48]
    histograms = events.Tags()["histograms"]  # every epoch by default: weights and the last batch's gradients
    assert {"weights/net.1.weight", "grads/net.1.weight"} <= set(histograms)
    assert [e.step for e in events.Histograms("grads/net.1.weight")] == [16, 32, 48]
    assert events.Tags()["graph"]  # the model graph, for the Graphs tab
    assert [e.value for e in events.Scalars("momentum")] == pytest.approx([0.9] * 9)  # Adam's beta1
    per_class = metrics["per_class_acc"]
    assert list(per_class) == [str(d) for d in range(10)] and all(0 <= a <= 1 for a in per_class.values())
    assert events.Scalars("test/acc_class/3")[0].value == pytest.approx(per_class["3"])

    hparams = events.PluginTagToContent("hparams")  # TensorBoard's HParams tab reads these
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model"].string_value == "MLP" and start.hparams["scheduler"].string_value == "step"
    assert start.hparams["dataset.augment_shift"].number_value == 2 and "dataset.root" not in start.hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    tags = {m.name.tag for m in experiment.metric_infos}
    # every test metric but the per-class ones (test/f1/<class>, ...: too many columns for a table)
    assert tags == {"test/loss", "test/acc", "test/f1", "test/balanced_acc", "test/acc_top5", "test/auroc",
                    "test/ece", "best/val/acc", "params"}
    # the model summary: an MLP of one 64-unit layer on 28x28 images, 784*64 + 64 + 64*10 + 10 parameters
    assert metrics["params"] == metrics["params_trainable"] == 50_890 == events.Scalars("params")[-1].value
    assert metrics["macs_per_image"] == 784 * 64 + 64 * 10
    assert "model/text_summary" in events.Tags()["tensors"]
    assert "MLP: 50,890 parameters (50,890 trainable), 0.05 M MACs per image" in result.stdout
    assert events.Scalars("best/val/acc")[-1].value == pytest.approx(metrics["best/val/acc"])


def test_resume_continues_at_the_right_epoch_with_the_same_state(tiny_root, tmp_path):
    straight, part = tmp_path / "straight", tmp_path / "part"
    common = (*MLP, "scheduler=step", "trainer.deterministic=true")
    assert run_train(*tiny(tiny_root, straight, *common, "trainer.max_epochs=3")).returncode == 0
    assert run_train(*tiny(tiny_root, part, *common, "trainer.max_epochs=1")).returncode == 0
    resumed = run_train(*tiny(tiny_root, tmp_path / "resume_invocation", *common, "trainer.max_epochs=3",
                              f"trainer.resume={part}/checkpoints/last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at the start of epoch 2 (step 16)" in resumed.stdout
    assert "config changed, trainer.max_epochs: 1 -> 3" in resumed.stdout
    assert "config changed, trainer.resume" not in resumed.stdout  # every resume names its checkpoint there
    assert "epoch 1/3" not in resumed.stdout and "epoch 2/3" in resumed.stdout
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)  # the run continued in its own directory
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (3, 48)
    for k in a["model"]:  # same data order, RNG and optimizer state: the same weights, bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"] if "momentum_buffer" in s else s["exp_avg"],
                           b["optimizer"]["state"][k]["momentum_buffer" if "momentum_buffer" in s else "exp_avg"])
    events = EventAccumulator(str(part))
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [16, 32, 48]  # one curve, no duplicated steps


def test_an_epoch_end_checkpoint_resumes_with_another_batch_size(tiny_root, tmp_path):
    # Mid-epoch, the batching decides which samples are left (refused, see BAD); at an epoch's end nothing is left.
    part = tmp_path / "part"
    assert run_train(*tiny(tiny_root, part, *MLP, "scheduler=step", "trainer.max_epochs=1")).returncode == 0
    resumed = run_train(*tiny(tiny_root, tmp_path / "again", *MLP, "scheduler=step", "trainer.max_epochs=2",
                              "dataset.batch_size=64", f"trainer.resume={part}/checkpoints/last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert "config changed, dataset.batch_size: 32 -> 64" in resumed.stdout
    state = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 16 + 8)  # 500 training images: 16 batches of 32, 8 of 64


def tree_digest(path):
    return {str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# (overrides, text naming the bad value, text saying what is allowed or what to do). {placeholders} are paths
# made by the `bad_paths` fixture: {earlier} is a finished run in the same output root.
BAD = [
    (["model=foo"], "Could not find 'model/foo'", "mlp"),  # Hydra lists the choices
    # a class of the user's that is not on the import path (a typo, or a module outside the current folder)
    (["model=custom", "model._target_=mynets.TinyNet"], "model._target_=mynets.TinyNet: cannot import it",
     "No module named 'mynets'"),
    (["optimizer=adamm"], "Could not find 'optimizer/adamm'", "adamw"),
    (["dataset=cifar"], "Could not find 'dataset/cifar'", "fashion_mnist"),
    (["loss=hinge"], "Could not find 'loss/hinge'", "multi_margin"),
    (["loss=bce", "loss.pos_weight=-1"], "loss.pos_weight=-1", "must be null or a finite number > 0"),
    (["trainer.ema_decay=1.5"], "trainer.ema_decay=1.5", "must be null (off) or a number strictly between 0 and 1"),
    (["trainer.ema_decay=0.9", "trainer.ema_warmup=abc"], "trainer.ema_warmup=abc", "must be true or false"),
    (["trainer.ema_warmup=true"], "trainer.ema_warmup=true", "set trainer.ema_decay"),
    # a true/false setting given anything else: the schema's type (trainer/cli/schema.py), and only true or false
    # on the command line (OmegaConf would read no, on and any number as a bool: trainer.compile=2 as true)
    (["trainer.deterministic=abc"], "trainer.deterministic=abc", "must be true or false"),
    (["trainer.compile=1"], "trainer.compile=1", "must be true or false"),
    (["trainer.log_graph=null"], "trainer.log_graph=null", "must be true or false"),
    (["dataset.shuffle=no"], "dataset.shuffle=no", "must be true or false"),
    (["dataset.download=abc"], "dataset.download=abc", "must be true or false"),
    (["model=cnn", "model.batch_norm=abc"], "model.batch_norm=abc", "must be true or false"),
    # the same for the keys of torch's own classes, which take any value: the schema types them too
    (["optimizer=sgd", "optimizer.nesterov=on"], "optimizer.nesterov=on", "must be true or false"),
    (["scheduler.cycle_momentum=no"], "scheduler.cycle_momentum=no", "must be true or false"),
    (["optimizer.lr=true"], "optimizer.lr=true", "must be a number"),
    (["optimizer.betas=0.9"], "optimizer.betas=0.9", "must be a list of numbers, such as optimizer.betas=[0.9,0.999]"),
    (["model=mlp", "model.hidden_sizes=512"], "model.hidden_sizes=512",
     "must be a list of integers, such as model.hidden_sizes=[512,256]"),
    (["model=mlp", "model.hidden_sizes=[64,a]"], "model.hidden_sizes=[64,a]", "must be a list of integers"),
    (["trainer.grad_clip_norm=true"], "trainer.grad_clip_norm=true", "must be a number or null"),
    (["trainer.grad_clip_norm=0"], "trainer.grad_clip_norm=0", "must be null or a number > 0"),
    (["loss.label_smoothing=yes"], "loss.label_smoothing=yes", "must be a number"),
    (["loss=bce", "loss.pos_weight=inf"], "loss.pos_weight=inf", "must be null or a finite number > 0"),
    (["dataset.augment_rotate=true"], "dataset.augment_rotate=true", "must be a number"),
    (["dataset.augment_cutout=28"], "dataset.augment_cutout=28", "must be smaller than the 28x28 images"),
    (["dataset.augment_shift=28"], "dataset.augment_shift=28", "must be smaller than the 28x28 images"),
    (["dataset.augment_rotate=200"], "dataset.augment_rotate=200", "must be a number of degrees from 0 to 180"),
    (["dataset.augment_cutout=-1"], "dataset.augment_cutout=-1", "must be an integer >= 0"),
    (["scheduler=linear"], "Could not find 'scheduler/linear'", "onecycle"),
    (["logger=wandb"], "Could not find 'logger/wandb'", "tensorboard"),
    (["trainer=fast"], "Could not find 'trainer/fast'", "default"),
    (["trainer.max_epoch=3"], "trainer.max_epoch: no such key", "did you mean trainer.max_epochs?"),
    (["optimizer.lr=[0.1"], "no viable alternative at input '[0.1'", "override_grammar"),
    (["optimizer.lr=-0.1"], "lr=-0.1", "Invalid learning rate"),
    (["optimizer.lr=0"], "optimizer.lr=0", "must be a finite number > 0"),
    (["optimizer.lr=abc"], "optimizer.lr=abc", "must be a number"),
    (["dataset.batch_size=0"], "dataset.batch_size=0", ">= 1"),
    (["dataset.batch_size=ten"], "dataset.batch_size=ten", "must be an integer"),
    # an option that extends another has its schema (tests/test_schema.py: every key of every option)
    (["dataset=fashion_mnist", "dataset.batch_size=abc"], "dataset.batch_size=abc", "must be an integer"),
    (["dataset=fashion_mnist", "dataset.val_size=true"], "dataset.val_size=true", "must be a count (an integer >= 0)"),
    (["seed=abc"], "seed=abc", "must be an integer"),
    (["dataset.bogus=1"], "dataset.bogus: no such key", "dataset has augment_cutout"),
    (["dataset.val_size=100000"], "dataset.val_size=100000", "smaller than"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", ">= 1"),
    (["trainer.device=cuda"], "trainer.device='cuda'", "CUDA is not available"),
    (["trainer.device=tpu"], "trainer.device='tpu'", "cpu, cuda"),
    (["trainer.monitor=val/accuracy"], "trainer.monitor=val/accuracy", "validation does not measure it; use one of "
     "val/loss, val/acc, val/f1, val/balanced_acc, val/acc_top5"),
    (["trainer.monitor=test/acc"], "trainer.monitor=test/acc", "not a validation metric; use val/<metric>"),
    (["trainer.monitor=val/ece"], "trainer.monitor=val/ece", "with trainer.full_val_metrics=true"),
    (["trainer.monitor=val/loss"], "trainer.mode=max with trainer.monitor=val/loss",
     "lower is better for it; set trainer.mode=min"),
    (["trainer.monitor=val/f1", "trainer.mode=min"], "trainer.mode=min with trainer.monitor=val/f1",
     "higher is better for it; set trainer.mode=max"),
    (["trainer.top_k=0"], "trainer.top_k=0", "must be an integer >= 1"),
    (["trainer.full_val_metrics=2"], "trainer.full_val_metrics=2", "must be true or false"),
    (["callbacks=[nope]"], "Could not find 'callbacks/nope'", "lists options of keep_checkpoints"),
    (["metrics=[nope]"], "Could not find 'metrics/nope'", "metrics=[...] lists options of cohen_kappa"),
    (["callbacks=[keep_checkpoints]", "callbacks.keep_checkpoints.keep_last=0"],
     "callbacks.keep_checkpoints.keep_last=0", "must be an integer >= 1"),
    (["logger=[tensorboard,csv]", "logger.csv.flush_secs=soon"], "logger.csv.flush_secs=soon", "must be a number"),
    (["trainer.mode=up"], "trainer.mode=up", "must be one of min, max"),
    (["trainer.nonfinite_loss=ignore"], "trainer.nonfinite_loss=ignore", "must be one of error, skip"),
    (["trainer.checkpoint_every_n_steps=0"], "trainer.checkpoint_every_n_steps=0", ">= 1"),
    (["trainer.grad_clip_norm=-1"], "trainer.grad_clip_norm=-1", "> 0"),
    (["seed=-1"], "seed=-1", ">= 0"),
    (["trainer.precision=fp16"], "trainer.precision=fp16", "needs CUDA"),
    (["trainer.precision=fp8"], "trainer.precision=fp8", "must be one of fp32, bf16, fp16"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0", ">= 1"),
    (["trainer.num_threads=0"], "trainer.num_threads=0", ">= 1"),
    (["model.activation=Relu"], "'Relu'", "GELU"),
    (["trainer.resume=/nonexistent/last.pt"], "/nonexistent/last.pt", "does not exist"),
    (["trainer.resume={junk}"], "junk.pt", "not a readable checkpoint"),
    (["trainer.resume={torn}"], "torn.pt", "truncated"),
    (["model=logistic", "trainer.resume={earlier}/checkpoints/last.pt"], "model._target_", "cannot resume"),
    (["scheduler=step", "trainer.max_epochs=3", "trainer.resume={earlier}/checkpoints/last.pt"],
     "its run finished 3 epochs and was tested", "raise trainer.max_epochs (now 3) above 3"),
    (["dataset.root=/nonexistent/data", "dataset.download=false"], "/nonexistent/data", "provision_data.py"),
    (["dataset.root={empty}"], "MNIST not found", "provision_data.py"),  # every source fails (offline)
    (["dataset.root={bad_magic}"], "train-images-idx3-ubyte: not an IDX file", "bad magic"),
    (["dataset.root={truncated}"], "t10k-images-idx3-ubyte", "the header [200, 28, 28] needs"),
    (["dataset.root={label_mismatch}"], "600 images but 599 labels", "train"),
    (["hydra.run.dir={earlier}"], "hydra.run.dir=", "already exists and is not empty"),
    (["hydra.run.dir={a_file}/run"], "a_file/run", "cannot write there"),
    (["optimizer.lr=inf"], "optimizer.lr=inf", "must be a finite number > 0"),
    (["optimizer.lr=1e30"], "training loss is nan at epoch 1, batch 2", "lower optimizer.lr"),
    (["trainer.resume={newer}"], "newer.pt was written by a newer version", "update the code"),
    (["scheduler=step", "dataset.batch_size=64", "trainer.max_epochs=4", "trainer.resume={mid_epoch}"],
     "dataset.batch_size: 32 in the checkpoint, 64 now", "written mid-epoch"),
    (["trainer.resume={attack}"], "attack.pt", "its stored config has the key model.x._args_"),
    (["dataset.root={a_file}"], "dataset.root=", "is a file, not a directory"),
    (["dataset.root={corrupt_gz}"], "train-images-idx3-ubyte.gz: not a valid gzip file", "replace it"),
    (["optimized_metric=test/accuracy"], "optimized_metric=test/accuracy", "must be one of test/loss"),
    (["loss.label_smoothing=2"], "loss=CrossEntropy", "label_smoothing must be between 0.0 and 1.0. Got: 2"),
]
# Sources a missing dataset could come from, made unreachable: no proxy answers, no package index.
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": ""}


@pytest.fixture(scope="module")
def bad_paths(finished_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    (base / "junk.pt").write_text("not a checkpoint")
    good = (finished_run[0] / "checkpoints" / "last.pt").read_bytes()
    (base / "torn.pt").write_bytes(good[: len(good) // 2])
    (base / "a_file").write_text("")
    (base / "empty").mkdir()
    roots = {}
    for name, file, mutate in (("bad_magic", "train-images-idx3-ubyte", lambda b: b"\x08\x03" + b[2:]),
                               ("truncated", "t10k-images-idx3-ubyte", lambda b: b[:-100]),
                               ("label_mismatch", "train-labels-idx1-ubyte", None)):
        roots[name] = make_tiny_dataset(base / name)
        path = base / name / "MNIST" / "raw" / file
        if mutate:
            path.write_bytes(mutate(path.read_bytes()))
        else:
            write_idx(path, torch.zeros(599, dtype=torch.uint8))
    state = torch.load(finished_run[0] / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "version": 99}, base / "newer.pt")
    torch.save({**state, "epoch": 1, "batch_in_epoch": 5, "global_step": 21}, base / "mid_epoch.pt")
    attack = yaml.safe_load(state["config"])
    attack["model"] = {"_target_": "builtins.dict", "x": {"_target_": "pathlib.Path.write_text",
                                                         "_args_": [str(base / "written"), "text"]}}
    torch.save({**state, "config": yaml.safe_dump(attack)}, base / "attack.pt")
    roots["corrupt_gz"] = make_tiny_dataset(base / "corrupt_gz")
    raw = base / "corrupt_gz" / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    return {"earlier": finished_run[0], "junk": base / "junk.pt", "torn": base / "torn.pt",
            "a_file": base / "a_file", "empty": base / "empty", "newer": base / "newer.pt",
            "attack": base / "attack.pt", "mid_epoch": base / "mid_epoch.pt", **roots}


# The rows run as a process, `python train.py` through its exit path: one of each kind of refusal (Hydra's,
# the schema's, an object's, a checkpoint's, a download's, a diverged run's) and what only the command does (Hydra's
# run-directory callback). The others run in-process through the library (conftest.train_in_process), which
# answers with the line the command prints.
AS_PROCESS = {"model=foo", "dataset.batch_size=ten", "optimizer.lr=[0.1", "trainer.max_epochs=0",
              "trainer.resume={junk}", "dataset.root={empty}", "optimizer.lr=1e30", "hydra.run.dir={earlier}",
              "hydra.run.dir={a_file}/run", "trainer.device=tpu"}


@pytest.mark.parametrize("overrides, names_value, says, as_process",
                         [(*b, " ".join(b[0]) in AS_PROCESS) for b in BAD], ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_clear_line_and_earlier_run_untouched(finished_run, bad_paths, tiny_root, tmp_path, overrides,
                                                            names_value, says, as_process):
    earlier, _ = finished_run
    before = tree_digest(earlier.parent)  # the whole output root the earlier run lives in
    overrides = [o.format(**bad_paths) for o in overrides]
    run_dir = [] if any(o.startswith("hydra.run.dir=") for o in overrides) else [f"hydra.run.dir={tmp_path / 'bad'}"]
    model = () if any(o.startswith("model=") for o in overrides) else MLP  # the row's own model, else the small MLP
    run = run_train if as_process else train_in_process
    result = run(*TINY, f"dataset.root={tiny_root}", *run_dir, *model, *overrides, env=OFFLINE)
    assert result.returncode == 1
    assert names_value in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # Hydra's config errors too
    assert tree_digest(earlier.parent) == before
    # refused before training: nothing left behind (a run that diverged keeps its directory, without checkpoints)
    assert not (tmp_path / "bad").exists() or "training loss is nan" in result.stderr, \
        sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "bad").rglob("*"))
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("*.pt"))
    assert not (bad_paths["junk"].parent / "written").exists()


def test_at_least_61_bad_inputs():
    assert len(BAD) >= 61


def test_diverging_run_names_the_batch_and_writes_no_checkpoint(tiny_root, tmp_path):
    result = run_train(*tiny(tiny_root, tmp_path / "run", *MLP, "optimizer=sgd", "optimizer.lr=1e6",
                             "scheduler=none"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "training loss is" in result.stderr and "at epoch 1, batch" in result.stderr, result.stderr
    assert "trainer.nonfinite_loss=skip" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the directory it keeps says why it ended, not only the console
    assert "[ERROR] error: training loss is" in (tmp_path / "run" / "train.log").read_text()


def test_debug_fast_dev_run_runs_a_few_batches_of_everything(tiny_root, tmp_path):
    result = run_train(*tiny(tiny_root, tmp_path / "run", "debug=fast_dev_run"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["global_step"]) == (2, 16)  # 2 epochs x 8 of the 16 batches
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_every_experiment_preset_runs_end_to_end(tiny_root, tmp_path):
    # the presets of MNIST and FashionMNIST; those of generated tensors files: tests/test_tasks.py
    presets = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")
                     if "override /dataset: tensors" not in p.read_text())
    assert {"mnist_fast", "mnist_cnn", "fashion_cnn", "mnist_mlp", "fashion_logistic", "mnist_best",
            "fashion_best"} <= set(presets)
    # trainer.cuda_graphs=false: mnist_fast_gpu replays CUDA graphs, which this CPU run cannot (tests/test_cuda.py)
    result = run_train("-m", *TINY, f"dataset.root={tiny_root}", f"output_root={tmp_path}", "debug=fast_dev_run",
                       "trainer.cuda_graphs=false", f"experiment={','.join(presets)}")
    assert result.returncode == 0, result.stderr
    finished = {json.loads(m.read_text())["epochs"] for m in tmp_path.rglob("metrics.json")}
    assert len(list(tmp_path.rglob("metrics.json"))) == len(presets) and finished == {2}
    # Each job ran its own preset: its options and every value it sets, except those the command line and
    # debug=fast_dev_run set after it.
    fast_dev_run = yaml.safe_load((REPO / "configs/debug/fast_dev_run.yaml").read_text())
    later = {o.split("=")[0] for o in (*TINY, "trainer.cuda_graphs=false")} | set(flat(fast_dev_run))
    jobs = {}
    for metrics in tmp_path.rglob("metrics.json"):
        hydra_dir = metrics.parent / ".hydra"
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
        name = next(o for o in overrides if o.startswith("experiment="))
        jobs[name.split("=")[1]] = hydra_dir
    assert sorted(jobs) == presets
    for preset, hydra_dir in jobs.items():
        spec = yaml.safe_load((REPO / "configs" / "experiment" / f"{preset}.yaml").read_text())
        choices = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
        for entry in spec.pop("defaults"):
            (key, option), = entry.items()  # "override /model": cnn
            assert choices[key.split("/")[-1]] == option, (preset, key)
        ran = flat(yaml.safe_load((hydra_dir / "config.yaml").read_text()))
        values = {k: v for k, v in flat(spec).items() if k not in later}
        assert values and all(ran[k] == v for k, v in values.items()), (preset, {k: ran[k] for k in values})


def flat(node, prefix=""):
    """{"a.b": leaf} for a nested dict."""
    out = {}
    for k, v in node.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_debug_overfit_memorises_a_few_batches(tiny_root, tmp_path):
    result = run_train(*tiny(tiny_root, tmp_path / "run", *MLP, "debug=overfit"))
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_epoch")][-1] == 30 * 4
    assert events.Scalars("train/acc")[-1].value == 1.0 and events.Scalars("train/loss_epoch")[-1].value < 0.01


@pytest.mark.parametrize("first, then, turned", [((), ("trainer.ema_decay=0.9",), "on"),
                                                 (("trainer.ema_decay=0.9",), (), "off")])
def test_turning_ema_on_or_off_on_resume_chooses_best_afresh(tiny_root, tmp_path, first, then, turned):
    """Raw and averaged validation values do not compare: the resumed run's first validation sets best.pt."""
    run = tmp_path / "run"
    assert run_train(*tiny(tiny_root, run, *MLP, "trainer.max_epochs=1", *first)).returncode == 0
    result = run_train(*tiny(tiny_root, tmp_path / "resuming", *MLP, "trainer.max_epochs=2", *then,
                             f"trainer.resume={run / 'checkpoints' / 'last.pt'}"))
    assert result.returncode == 0, result.stderr
    assert f"trainer.ema_decay turned {turned}; best.pt is chosen afresh" in result.stdout
    assert json.loads((run / "metrics.json").read_text())["best/epoch"] == 2
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 2


def test_the_console_says_what_limits_and_averaging_the_run_uses(tiny_root, tmp_path):
    result = run_train(*tiny(tiny_root, tmp_path / "run", *MLP, "trainer.max_epochs=1", "scheduler=none",
                             "trainer.limit_train_batches=3", "trainer.limit_eval_batches=1",
                             "trainer.ema_decay=0.9", "trainer.ema_warmup=true"))
    assert result.returncode == 0, result.stderr
    assert "limited: each epoch trains on the first 3 batches; val and test use the first 1 batch" in result.stdout
    assert "EMA of the weights, decay 0.9 with warm-up: validation, test and best.pt use the average" in result.stdout
    plain = run_train(*tiny(tiny_root, tmp_path / "plain", *MLP, "trainer.max_epochs=1", "scheduler=none"))
    assert "limited:" not in plain.stdout and "EMA" not in plain.stdout, plain.stdout
