"""Training: Algorithm 1 of Ho et al. 2020 (arXiv:2006.11239) as a generator of per-step records.

The algorithm itself is `algorithm_1_step`: lines 3-5, t, eps and one Adam step on L_simple =
|eps - eps_theta(x_t, t)|^2 (Eq. 14). The `Trainer` around it feeds it batches x_0 (line 2),
stops on a NaN loss before it reaches the weights, averages the gradient over MPI ranks, and
updates the EMA of the weights after each step. `train(config, out_dir)` runs the Trainer and
yields {"step", "loss", "lr", "grad_norm", ...}; with an `out_dir` it also writes the
checkpoint, the metrics log, the loss curve and EMA sample grids there. Every knob is a
commented field of config.TrainConfig; presets bundle them.
With `conditional`, the model is eps_theta(x_t, t, y) on the data's labels, each replaced by
"no label" with probability p_uncond (Ho & Salimans 2022, Algorithm 1), for classifier-free guidance.
Under `mpiexec -n N` (mpi4py installed) the run is data-parallel over N ranks: see distributed.py.
With config.timestep_sampler "importance", t is drawn from Improved DDPM's p_t (Eq. 18, resample.py)
and the loss reweighted by 1 / (T p_t); the sampler's loss history is part of the checkpoint.
May import: backend, optim, diffusion, data, images, checkpoint, distributed, config, resample, sampling.
"""
import json
import math
import os
import time

from . import backend, checkpoint, data, distributed, images
from .config import TrainConfig, build_diffusion, build_model, config_to_dict, validate
from .diffusion import NO_LABEL
from .optim import EMA, Adam
from .resample import make_timestep_sampler
from .sampling import draw_samples, every_class

CHECKPOINT = checkpoint.FILENAME  # DIR/checkpoint.safetensors
GRID_STEPS = 50  # DDIM steps for the periodic sample grids: ~20x cheaper than the full chain


LABELLED_DATA = ("the bundled digits and mnist, MNIST IDX files with their labels file beside them, CIFAR-10 "
                 "batches, .npz files with a 'labels' array, or an image folder with one subfolder per class")


def load_data(config):
    """Training data as a host float32 array, its labels (None without) and its info dict
    (2-D toys: 20,000 fixed points). A conditional config on data without labels is a DataError."""
    if config.data in data.TOY_DATASETS:
        if config.conditional:
            raise data.DataError(f"--conditional needs labelled images; {config.data!r} is unlabelled 2-D points. "
                                 f"Labelled data: {LABELLED_DATA}")
        points = data.sample_toy(config.data, 20000, rng=backend.host.random.default_rng([config.seed, 7]))
        return points, None, {"name": config.data, "image_size": None, "channels": None, "grey_levels": None,
                              "hflip": False}
    images_, labels, info = data.load_images(config.data, "train", image_size=config.image_size or None)
    if config.conditional and labels is None:
        raise data.DataError(f"--conditional needs labels, and {config.data} has none. Labelled data: "
                             f"{LABELLED_DATA}")
    return images_, labels, info


# ---------------------------------------------------------------- the training run


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient became NaN or infinite: training stops and nothing more is saved."""


def algorithm_1_step(diffusion, model, optimizer, x_start, rng, model_kwargs=None, before_update=None,
                     timestep_sampler=None):
    """One gradient step of Algorithm 1 (Ho et al. 2020) on a batch x_0 ~ q(x_0) (line 2):

        3: t ~ Uniform({1, ..., T})
        4: eps ~ N(0, I)
        5: take a gradient descent step on grad_theta || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

    Code t runs over 0 .. T - 1 (the paper's 1 .. T); the loss is L_simple (Eq. 14) or whatever
    `diffusion.loss_type` asks for, and the step is `optimizer`'s (Adam with warmup and clipping).
    `before_update(loss)`, when given, runs between the gradient and the update: the Trainer's
    place to stop on a NaN loss and to average the gradient over ranks.
    `timestep_sampler` (resample.py) replaces line 3's uniform t, e.g. by Improved DDPM's importance
    sampling (Eq. 18), whose weights 1 / (T p_t) keep the mean loss an unbiased estimate of line 5's.
    Returns the loss (a 0-d Tensor), what optimizer.step() returns (Adam: the gradient norm), t and the
    per-sample losses (an array (N,), before weighting: what an importance sampler learns p_t from).
    """
    if timestep_sampler is None:
        t, weights = rng.integers(0, diffusion.num_timesteps, (len(x_start),)), None    # line 3
    else:
        t, weights = timestep_sampler.sample(rng, len(x_start))                          # line 3, or Eq. 18
    noise = rng.normal(x_start.shape)                                                  # line 4
    losses = diffusion.training_losses(model, x_start, t, noise=noise, model_kwargs=model_kwargs)["loss"]
    loss = (losses if weights is None else losses * weights).mean()
    optimizer.zero_grad()
    loss.backward()                                                                    # line 5: the gradient
    if before_update is not None:
        before_update(loss)
    return loss, optimizer.step(), t, losses.data                                      # line 5: the step


class Trainer:
    """Everything a run holds: data stream, model, EMA, optimizer and random streams.

    Its `state_dict` is the whole run, so a resumed run continues bit for bit. With a
    `world` of N > 1 ranks (default: distributed.world(), MPI under mpiexec) this rank
    trains on its share of each global batch, with that share's random numbers, and the
    gradients are averaged over ranks; the state_dict is the same on every rank and
    holds nothing per rank, so any N resumes it.
    """

    def __init__(self, config, world=None):
        validate(config)
        self.world = world or distributed.world()
        self.world.check_batch(config.batch_size)
        backend.use_backend(config.backend)
        self.config = config
        self.data, labels, self.info = load_data(config)
        # int64: NO_LABEL (-1) must fit (an .npz may hold uint8 labels)
        self.labels = labels.astype(backend.host.int64) if config.conditional else None
        self.batches = data.Batches(self.data, config.batch_size, rng=[config.seed, 1], hflip=config.hflip,
                                    labels=self.labels)
        backend.manual_seed(config.seed)   # the default generator: weight init here, dropout masks later
        self.model = build_model(config, self.info["channels"], self.info["image_size"], self.num_classes)
        # Each rank keeps its rows of every global draw (dropout masks here, t and eps below).
        backend.set_default_generator(self.world.sharded(backend.default_generator()))
        self.model.train()
        self.diffusion = build_diffusion(config)
        self.optimizer = Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                              warmup_steps=config.warmup, grad_clip=config.grad_clip)
        self.ema = EMA(self.model, decay=config.ema_decay)
        self.rng = self.world.sharded(backend.Generator([config.seed, 2]))   # t and eps of Algorithm 1
        self.timestep_sampler = make_timestep_sampler(config.timestep_sampler, self.diffusion.num_timesteps)
        self.step = 0
        self.loss = None    # the last step's loss (the global batch's under MPI), a Python float
        self.stop = False   # MPI: set when some rank asked to stop after the current step

    @property
    def num_classes(self):
        """K of a conditional run (the data's labels 0 .. K-1), else None."""
        return self.info.get("num_classes") if self.config.conditional else None

    def grid_width(self, num):
        """Images per grid row: one row per class for a conditional run's `num` samples, else square."""
        return None if self.num_classes is None else num // self.num_classes

    def train_step(self):
        """One step of Algorithm 1 (algorithm_1_step) and the run's bookkeeping; returns (loss, grad_norm, lr)."""
        cfg, world = self.config, self.world
        batch = next(self.batches)                                     # line 2: x_0 ~ q(x_0), this rank's rows
        x_start = backend.to_active(world.shard(batch[0] if self.labels is not None else batch))
        kwargs = None
        if self.labels is not None:   # Ho & Salimans, Algorithm 1: c <- no label with probability p_uncond
            y = backend.to_active(world.shard(batch[1]))
            drop = self.rng.uniform((len(x_start),)) < cfg.p_uncond   # per sample, like t and eps (any rank count)
            kwargs = {"y": backend.xp_of(y).where(drop, NO_LABEL, y)}
        lr = self.optimizer.current_lr()
        _, grad_norm, t, losses = algorithm_1_step(self.diffusion, self.model, self.optimizer, x_start, self.rng,
                                                   model_kwargs=kwargs, before_update=self._check_and_average,
                                                   timestep_sampler=self.timestep_sampler)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {self.step + 1}")
        if cfg.timestep_sampler != "uniform":   # every rank learns p_t from the whole global batch, in its order
            host = backend.host
            self.timestep_sampler.update(world.gather(host.asarray(backend.to_numpy(t), dtype=host.int64)),
                                         world.gather(host.asarray(backend.to_numpy(losses), dtype=host.float64)))
        self.stop = world.stop_agreed   # MPI: some rank asked to stop (Ctrl-C); all stop after this same step
        if cfg.ema_warmup:   # early on, average over the ~n steps taken so far instead of the init weights
            self.ema.decay = min(cfg.ema_decay, (1 + self.ema.num_updates) / (10 + self.ema.num_updates))
        self.ema.update(self.model)
        self.step += 1
        return self.loss, grad_norm, lr

    def _check_and_average(self, loss):
        """Between line 5's gradient and its update: the loss as a float, the global batch's under
        MPI (`self.loss`), a NaN stopping the run before it reaches the weights; then the gradient
        averaged over the ranks, so that every rank takes the 1-process step."""
        self.loss = self.world.global_loss(float(loss.data))   # a GPU sync, needed every step for the check
        if not math.isfinite(self.loss):
            raise TrainingDiverged(f"loss is {self.loss} at step {self.step + 1}")
        self.world.mean_gradients_(self.optimizer.flat)   # one Allreduce of the flat gradient buffer (N > 1)

    def state_dict(self):
        return {
            "format": "minidiff-train", "step": self.step, "config": config_to_dict(self.config),
            "data_info": self.info, "model_config": self.model.config,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {"train": self.rng.get_state(), "default": backend.default_generator().get_state(),
                    "batches": self.batches.state_dict()},
            "timestep_sampler": self.timestep_sampler.state_dict(),
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"]["train"])
        backend.default_generator().set_state(state["rng"]["default"])
        self.batches.load_state_dict(state["rng"]["batches"])
        self.timestep_sampler.load_state_dict(state.get("timestep_sampler", {}))   # absent before it existed
        self.step = int(state["step"])

    def save(self, path):
        checkpoint.save(path, self.state_dict())

    def replicated_arrays(self):
        """The arrays every MPI rank must hold bit for bit: weights, Adam's moments, the EMA."""
        opt = self.optimizer
        return [opt.flat.data, opt.flat_exp_avg, opt.flat_exp_avg_sq, self.ema.flat_shadow]

    def sample(self, num, seed, steps=0, progress=False, sampler=None):
        """`num` samples from the EMA weights, with their own seed (the training streams are untouched).

        `sampler` and `steps` as sampling.sampling_plan: without a sampler, steps 0 runs all T steps of
        Algorithm 2 and fewer run DDIM; steps 0 with a sampler is that sampler's default. A
        conditional run draws num // K of every class in label order (a grid row per class when
        num // K is its width), guided with config.guidance."""
        shape = (2,) if self.info["channels"] is None else (
            self.info["channels"], self.info["image_size"], self.info["image_size"])
        labels = None if self.num_classes is None else every_class(self.num_classes, num)
        with self.ema.swapped(self.model):
            self.model.eval()
            try:
                return draw_samples(self.diffusion, self.model, shape, len(labels) if labels is not None else num,
                                    seed, sampler=sampler, steps=steps, progress=progress, labels=labels,
                                    guidance=self.config.guidance if labels is not None else 0.0)
            finally:
                self.model.train()


def train(config, out_dir=None, resume=False, progress=False, world=None):
    """Run Algorithm 1 and yield one record per step: {"step", "loss", "lr", "grad_norm", "time", ...}.

    With `out_dir`: resume from DIR/checkpoint.safetensors if `resume`; write the checkpoint
    every `checkpoint_every` steps and at the end (atomically), the metrics log, loss.png and
    sample grids; after the last record, DIR/samples.png (`progress` shows its sampling bar).
    A record also carries "checkpoint" or "samples" (a path) on the steps that wrote one.
    Closing the generator early (Ctrl-C in the CLI) saves a checkpoint of the last finished
    step. A NaN loss raises TrainingDiverged and leaves the last good checkpoint in place.
    While it runs, DIR/.lock names this process: a second run on the folder gets
    checkpoint.RunFolderLocked.

    Under MPI (`world`, default distributed.world()) every rank runs this; rank 0 alone reads
    the checkpoint to resume (and sends it to the others) and writes files. At each checkpoint
    the ranks compare a checksum of their weights. An error on one rank ends every rank
    (MPI_Abort) with a message naming it; the last checkpoint stays valid. A record carries
    "stop" when some rank asked to stop (distributed.World.stop_requested) after this step.
    """
    trainer = Trainer(config, world)
    world = trainer.world
    write = out_dir is not None and world.is_root   # rank 0 alone writes files
    lock = checkpoint.RunFolderLock(out_dir) if write else None
    if out_dir is not None:
        def take_folder():   # on rank 0; its error (RunFolderLocked, OSError) is raised on every rank
            if write:
                os.makedirs(out_dir, exist_ok=True)
                lock.acquire()   # before the checkpoint is read: no other run may write it meanwhile
        world.from_root(take_folder)
    try:
        yield from _run(trainer, config, out_dir, resume, progress, world, write)
    finally:
        if lock is not None:
            lock.release()


def _run(trainer, config, out_dir, resume, progress, world, write):
    """train()'s body, once the run folder is this process's."""
    start = 0
    if out_dir is not None:
        ckpt_path = os.path.join(out_dir, CHECKPOINT)
        if resume:
            state = world.from_root(lambda: checkpoint.load(ckpt_path))   # rank 0's file, sent to every rank
            check_resumable(state, config)
            trainer.load_state_dict(state)
            start = trainer.step
        if write:
            log = MetricsLog(out_dir, config.log_format, keep_until=start)
    saved_step = start

    def failure():   # what rank 0 adds when some rank fails (MPI only)
        kept = f"the last checkpoint (step {saved_step}) in {out_dir} is intact" if out_dir is not None and \
            saved_step else "no checkpoint was written yet"
        return (f"all {world.size} ranks are stopped (MPI_Abort) at step {trainer.step + 1}; {kept}"
                + (f"; continue with 'minidiff train --out {out_dir} --resume'" if saved_step else ""))

    def kept_note():   # what a divergence leaves behind
        if out_dir is None:
            return ""
        if not saved_step:
            return f"; no checkpoint was written to {out_dir}"
        return f"; the last good checkpoint (step {saved_step}) is kept in {out_dir}"

    began = time.perf_counter()
    try:
        while trainer.step < config.steps:
            try:
                loss, grad_norm, lr = trainer.train_step()
            except TrainingDiverged as err:
                raise TrainingDiverged(f"{err}: training stopped{kept_note()}. Try a lower --lr") from None
            step = trainer.step
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "time": time.perf_counter() - began}
            if write:
                if step % config.log_every == 0 or step == config.steps:
                    log.write(record)
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
                    path = os.path.join(out_dir, "samples", f"step_{step:07d}.png")
                    grid = trainer.sample(min(config.num_samples, 64), seed=config.seed,
                                          steps=min(GRID_STEPS, config.num_timesteps - 1))
                    _save_picture(grid, path, trainer.data, trainer.grid_width(len(grid)))
                    record["samples"] = path
            if out_dir is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                world.check_replicas(trainer.replicated_arrays(), step)   # every rank (MPI only)
                if write:
                    try:
                        trainer.save(ckpt_path)
                    except checkpoint.NonFiniteError as err:
                        raise TrainingDiverged(f"{err}; that checkpoint was not written: training stopped"
                                               f"{kept_note()}. Try a lower --lr") from None
                    log.flush()
                    log.plot(os.path.join(out_dir, "loss.png"))
                saved_step = step
                record["checkpoint"] = ckpt_path
            if trainer.stop:
                record["stop"] = True
            yield record
    except GeneratorExit:  # the consumer stopped early (Ctrl-C): the last step is complete, save it
        if write and trainer.step > saved_step:
            trainer.save(ckpt_path)
            log.flush()
            log.plot(os.path.join(out_dir, "loss.png"))
        raise
    except (TrainingDiverged, distributed.DistributedError):   # raised by every rank together
        raise
    except (Exception, KeyboardInterrupt) as err:   # MPI: one rank failed; rank 0 reports it, all ranks end
        world.fail(err, failure())
        raise
    finally:
        if write:
            log.close()
    if write:  # the final grid, drawn once the last step's record is out
        samples = trainer.sample(config.num_samples, seed=config.seed, steps=config.sample_steps, progress=progress,
                                 sampler=config.sampler)
        _save_picture(samples, os.path.join(out_dir, "samples.png"), trainer.data, trainer.grid_width(len(samples)))


def check_resumable(state, config):
    """Refuse to resume with a changed model, data or recipe (only step counts and outputs may change)."""
    saved = state["config"]
    free = {"steps", "backend", "log_every", "checkpoint_every", "sample_every", "num_samples", "sample_steps",
            "sampler", "log_format", "guidance"}
    now = config_to_dict(config)
    defaults = config_to_dict(TrainConfig())   # a checkpoint older than an option ran with its default
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    changed = [f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in now if k not in free and saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"cannot resume with a different configuration: {', '.join(changed)}")
    try:   # a corrupt loss history is refused here, before anything is built
        make_timestep_sampler(config.timestep_sampler, config.num_timesteps).load_state_dict(
            state.get("timestep_sampler", {}))
    except ValueError as err:
        raise ValueError(f"the checkpoint's timestep sampler state is unusable: {err}") from None
    if state["step"] >= config.steps:
        raise ValueError(f"the checkpoint has already trained {state['step']} steps; pass --steps above that to continue")


def _save_picture(samples, path, data_points=None, nrow=None):
    """A grid for images (`nrow` per row), a scatter plot (against the data) for 2-D points; written
    atomically, so a kill during the write leaves the previous picture, never half of one."""
    with checkpoint.atomic_path(path) as tmp:
        if samples.ndim == 2:
            reference = data_points[:len(samples)] if data_points is not None else samples
            images.scatter_2d([reference, samples], tmp, titles=["data", "samples"])
        else:
            images.save_grid(samples, tmp, nrow=nrow)


class MetricsLog:
    """The per-step metrics file (JSON lines or CSV), append-only, and the loss curve drawn from it.

    Rows are appended whole and fsynced at every checkpoint (`flush`), so a crash or kill -9
    shortens the file by at most its last, torn line. On resume the rows up to the checkpoint's
    step are kept: when the file holds more (steps that run again, or a torn line) it is first
    rewritten atomically with exactly those rows; then it is opened for appending.
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "time")

    def __init__(self, out_dir, fmt, keep_until=0):
        self.path = os.path.join(out_dir, "metrics." + fmt)
        self.fmt = fmt
        self.steps, self.losses = [], []
        kept, dropped = [], True
        if keep_until and os.path.exists(self.path):
            rows, torn = _read_rows(self.path)
            kept = [row for row in rows if row["step"] <= keep_until]
            dropped = torn or len(kept) < len(rows)
        if dropped:   # a fresh run, or rows to drop: write exactly the kept rows, whole or not at all
            with checkpoint.atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.write(self._header() + "".join(self._line(row) for row in kept))
        for row in kept:
            self.steps.append(row["step"])
            self.losses.append(row["loss"])
        self.file = open(self.path, "a")

    def _header(self):
        return ",".join(self.FIELDS) + "\n" if self.fmt == "csv" else ""

    def _line(self, row):
        if self.fmt == "csv":
            return ",".join(repr(row[k]) for k in self.FIELDS) + "\n"
        return json.dumps({k: row[k] for k in self.FIELDS}) + "\n"

    def write(self, record):
        row = {k: record[k] for k in self.FIELDS}
        self.file.write(self._line(row))
        self.steps.append(row["step"])
        self.losses.append(row["loss"])

    def flush(self):
        """Every row so far on disk: a crash after this loses none of them."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def plot(self, path):
        if self.steps:
            with checkpoint.atomic_path(path) as tmp:
                images.plot_curve(self.steps, self.losses, tmp, title="training loss (L_simple)", log_y=True,
                                  smooth=True)

    def close(self):
        self.file.close()


def _read_rows(path):
    """(rows as dicts of numbers, torn) of a metrics.jsonl or .csv file; torn: a line was unreadable or
    cut short, so the file needs rewriting before rows are appended.

    A crash can leave the last line half written; such a line, or any other that does not parse, is
    skipped, never an error: the log must not stop a run from resuming."""
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    torn = bool(text) and not text.endswith("\n")   # a last line without its newline was cut short
    rows = []
    if path.endswith(".csv"):
        header, lines = (lines[0].strip().split(","), lines[1:]) if lines else ([], [])
    for line in lines:
        if not line.strip():
            continue
        try:
            if path.endswith(".csv"):
                values = line.strip().split(",")
                if len(values) != len(header):
                    raise ValueError(line)
                row = {k: float(v) if k != "step" else int(v) for k, v in zip(header, values)}
            else:
                row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "loss" not in row:
                raise ValueError(line)
        except ValueError:
            torn = True
            continue
        rows.append(row)
    return rows, torn


def read_metrics(path):
    """The rows of a metrics.jsonl or metrics.csv file as dicts of numbers (a torn last line skipped)."""
    return _read_rows(path)[0]
