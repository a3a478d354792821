"""The SGLang **simulator**: a stand-in for the three GPU SGLang servers (no model, no GPU).

It speaks SGLang 0.5.23's HTTP protocol with SGLang's request validation and
error shapes, answers α-UMi prompts from recorded trajectories (or with clearly
synthetic answers), honours ``stop``, ``max_new_tokens`` and ``regex``/``ebnf``/
``json_schema`` constraints, and models latency, concurrency limits and a
per-replica prefix cache. Everything it returns is labelled as simulated.

Usage::

    from services.simulator import LLAMA2_7B_1GPU, SimulatorConfig, create_app, run_simulator

    app = create_app(SimulatorConfig(role="caller"))                       # ASGI app for tests
    run_simulator(SimulatorConfig(role="planner", port=30001, latency="llama2-7b-1gpu"))

or from a shell: ``python -m services.simulator --role planner --port 30001``.
"""

from services.simulator.config import (
    INSTANT,
    LATENCY_PROFILES,
    LLAMA2_7B_1GPU,
    LatencyProfile,
    SimulatorConfig,
)
from services.simulator.engine import SimulatorEngine
from services.simulator.replay import ReplayIndex, detect_role
from services.simulator.server import create_app, run_simulator
from services.simulator.tokenizer import PseudoTokenizer

__all__ = [
    "INSTANT",
    "LATENCY_PROFILES",
    "LLAMA2_7B_1GPU",
    "LatencyProfile",
    "PseudoTokenizer",
    "ReplayIndex",
    "SimulatorConfig",
    "SimulatorEngine",
    "create_app",
    "detect_role",
    "run_simulator",
]
