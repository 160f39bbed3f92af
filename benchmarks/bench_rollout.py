"""Speed of controller rollouts in the real CarRacing-v3, measured side by side in one run.

    python benchmarks/bench_rollout.py                      # ~2 minutes on 2 cores
    python benchmarks/bench_rollout.py --envs 256 --steps 200 --workers 8

Prints, with the same environment worker processes and the same cores throughout:

(a) bare environment speed with random actions and no models: a plain single-process
    gymnasium loop, and :class:`CarRacingPool` with ``--workers`` workers (the baseline);
(b) agent steps/s of the full V + M + C loop (``run_episodes`` with ``RealWorld``: one
    batched V encode, one batched M step and one batched controller call per time step) on
    the same pool, as a ratio to (a) (target >= 0.8x);
(c) agent steps/s of the loop as earlier implementations wrote it: as many processes as
    (a) has workers, each with its own V, M and one env per agent, and one ``model.predict()``
    per agent per step for V and for M; batched / per-agent (target >= 20x).

V and M are untrained (speed does not depend on the weights). Resets (track generation)
are included in every measurement alike.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from models.controller import controller_actions, num_parameters  # noqa: E402
from worldmodels.env import ACTION_HIGH, ACTION_LOW, make_env, preprocess, to_env_action  # noqa: E402
from worldmodels.envpool import CarRacingPool  # noqa: E402
from worldmodels.parallel import resolve_workers  # noqa: E402

# TensorFlow and the models are imported in main(): the pool's spawned workers re-import this script.


def plain_loop(seeds: np.ndarray, steps: int) -> float:
    """Env steps/s of one gymnasium CarRacing-v3 in this process, random actions: per seed, reset and ``steps`` steps."""
    env = make_env(steps + 1)
    rng = np.random.default_rng(0)
    count = 0
    start = time.perf_counter()
    for seed in seeds:
        env.reset(seed=int(seed))
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(rng.uniform(ACTION_LOW, ACTION_HIGH).astype(np.float32))
            count += 1
            if terminated or truncated:
                break
    seconds = time.perf_counter() - start
    env.close()
    return count / seconds


def bare_pool(pool: CarRacingPool, seeds: np.ndarray, steps: int) -> float:
    """Env steps/s of the pool with random actions: reset, then ``steps`` steps of every env."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    pool.reset(seeds)
    active = np.ones(len(seeds), bool)
    count = 0
    for _ in range(steps):
        actions = rng.uniform(ACTION_LOW, ACTION_HIGH, size=(len(seeds), 3)).astype(np.float32)
        _, _, terminated, truncated = pool.step(actions, active)
        count += int(active.sum())
        active &= ~(terminated | truncated)
        if not active.any():
            break
    return count / (time.perf_counter() - start)


def batched_loop(world, params: np.ndarray, seeds: np.ndarray, steps: int) -> float:
    """Agent steps/s of the shared rollout loop (V, M and C batched over all agents)."""
    from worldmodels.rollout import run_episodes

    start = time.perf_counter()
    result = run_episodes(world, params, seeds[:, None], max_steps=steps)
    return int(result.lengths.sum()) / (time.perf_counter() - start)


def per_agent_models(vae, rnn):
    """Keras models called with ``predict`` once per agent: V's encoder and a one-step M with state inputs."""
    import keras

    lstm = rnn.net.get_layer("lstm")
    inputs = keras.Input((1, rnn.z_size + rnn.action_size))
    h_in, c_in = keras.Input((rnn.hidden_units,)), keras.Input((rnn.hidden_units,))
    step_lstm = keras.layers.LSTM(rnn.hidden_units, return_state=True)
    output, h, c = step_lstm(inputs, initial_state=[h_in, c_in])
    mdn = keras.layers.Dense(rnn.net.get_layer("mdn").units)
    step_model = keras.Model([inputs, h_in, c_in], [mdn(output), h, c])
    step_lstm.set_weights(lstm.get_weights())
    mdn.set_weights(rnn.net.get_layer("mdn").get_weights())
    return vae.encoder, step_model


def per_agent_worker(queue, barrier, seeds, steps: int) -> None:
    """One process of the per-agent baseline: its own models and one env per agent, stepped in turn.

    Every agent calls ``predict`` for V, then the controller, then ``predict`` for M, then
    steps its env. Reports (agent steps, seconds) of the timed part on ``queue``.
    """
    import keras  # noqa: F401  (imported before the barrier so start-up is not timed)

    from models.mdn_rnn import MDNRNN
    from models.vae import ConvVAE

    encoder, step_model = per_agent_models(ConvVAE(seed=0), MDNRNN(seed=0))
    hidden = step_model.inputs[1].shape[-1]
    params = np.random.default_rng(0).normal(0.0, 0.1, size=num_parameters())
    envs = [make_env(steps + 1) for _ in seeds]

    def run(count_steps):
        frames = [preprocess(env.reset(seed=int(seed))[0]) for env, seed in zip(envs, seeds)]
        h = np.zeros((len(envs), 1, hidden), np.float32)
        c = np.zeros_like(h)
        count = 0
        for _ in range(count_steps):
            for i, env in enumerate(envs):
                mu, _ = encoder.predict(frames[i][None].astype(np.float32) / 255.0, verbose=0)
                action = to_env_action(controller_actions(params, mu, h[i]))
                za = np.concatenate([mu, action], axis=-1)[:, None, :]
                _, h[i], c[i] = step_model.predict([za, h[i], c[i]], verbose=0)
                obs, _, terminated, truncated, _ = env.step(action[0])
                frames[i] = preprocess(obs)
                count += 1
        return count

    run(1)  # warm-up: predict() traces its functions on the first call
    barrier.wait()
    start = time.perf_counter()
    count = run(steps)
    queue.put((count, time.perf_counter() - start))


def per_agent_processes(workers: int, agents: int, steps: int) -> float:
    """Agent steps/s of ``workers`` processes running the per-agent loop at the same time."""
    context = mp.get_context("spawn")
    queue, barrier = context.Queue(), context.Barrier(workers)
    seeds = np.array_split(np.arange(agents) + 2000, workers)
    processes = [context.Process(target=per_agent_worker, args=(queue, barrier, part, steps)) for part in seeds]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(count / seconds for count, seconds in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=64, help="environments (agents) stepped together")
    # 200 steps: CarRacing zooms in for its first 50 steps and draws far more of the track then,
    # and a new track is generated at every reset, so shorter measurements (40 steps, the old
    # default) under-state the speed of real 1000-step episodes for (a) and (b) alike.
    parser.add_argument("--steps", type=int, default=200, help="steps per measurement (episodes are not cut short)")
    parser.add_argument("--workers", type=int, default=0, help="environment worker processes (0 = one per core)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measure (a) and (b) this many times, alternating, and keep the fastest of each")
    parser.add_argument("--per-agent-envs", type=int, default=8, help="agents of the slow per-agent baseline")
    parser.add_argument("--per-agent-steps", type=int, default=10, help="steps of the slow per-agent baseline")
    args = parser.parse_args()

    import tensorflow as tf

    from models.mdn_rnn import MDNRNN
    from models.vae import ConvVAE
    from worldmodels.rollout import RealWorld

    workers = min(resolve_workers(args.workers), args.envs)
    seeds = np.arange(args.envs) + 1000
    vae, rnn = ConvVAE(seed=0), MDNRNN(seed=0)
    params = np.random.default_rng(0).normal(0.0, 0.1, size=(args.envs, num_parameters()))
    print(f"{args.envs} envs, {args.steps} steps, {workers} worker process(es), "
          f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}", flush=True)

    plain, bare, full = [], [], []
    # max_steps beyond --steps: every measurement runs exactly --steps steps of every env.
    with CarRacingPool(args.envs, args.steps + 1, "process", workers) as pool:
        world = RealWorld(pool, vae, rnn)
        batched_loop(world, params[:2], seeds[:2], 2)  # trace the tf.functions once, outside the timings
        for _ in range(args.repeats):  # alternating, so a burst of outside load hits both alike
            plain.append(plain_loop(seeds[:2], args.steps))
            bare.append(bare_pool(pool, seeds, args.steps))
            full.append(batched_loop(world, params, seeds, args.steps))
    plain, bare, full = max(plain), max(bare), max(full)
    agents = min(args.per_agent_envs, args.envs)
    slow = per_agent_processes(workers, agents, args.per_agent_steps)

    rows = [
        ("(a) plain make_env loop, random actions, 1 process", plain, plain / bare, ""),
        (f"(a) CarRacingPool, random actions, {workers} workers", bare, 1.0, "baseline"),
        ("(b) batched V + M + C rollout loop, same pool", full, full / bare, ">= 0.8"),
        (f"(c) per-agent predict() for V and M, {workers} processes", slow, slow / bare, ""),
    ]
    print(f"{'measurement':<56} {'steps/s':>9} {'vs (a)':>8}  target")
    for name, value, ratio, target in rows:
        print(f"{name:<56} {value:9.1f} {ratio:8.2f}  {target}")
    print(f"{'batched (b) / per-agent (c)':<56} {'':>9} {full / slow:8.1f}  >= 20")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine lowers every number)")


if __name__ == "__main__":
    main()
