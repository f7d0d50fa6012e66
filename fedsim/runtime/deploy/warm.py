"""A SuperNode's ClientApp runner that stays warm: Flower's own `flwr-clientapp`, forked per
message from a process that has already imported what the ClientApp imports.

Under Flower's default isolation (`--isolation subprocess`) a SuperNode's SuperExec starts a new
`flwr-clientapp` process for every message, and that process imports torch, transformers, PEFT and
datasets again, about ten seconds on a small machine, before it trains for a fraction of one
(docs/results/deploy-overhead.md). Flower 1.41 has no local executor that keeps a process warm (its
SuperExec executors are `subprocess` and `kubernetes`), so `fedsim supernode` starts the SuperNode
with `--isolation process` and runs `serve` beside it, in SuperExec's place:

- it imports the heavy third-party packages once (`WARM_IMPORTS`); each child forgets the app's
  own packages (`forget_app_modules`: this runner is itself part of `fedsim`), so every message
  runs the ClientApp code of the run's app bundle (FAB), as Flower loads it;
- it asks the SuperNode's Runtime API for a ClientApp task every `poll_s` seconds (Flower's
  `AcquireTask`, what SuperExec asks), and for each task forks a child that runs Flower's own
  `run_clientapp` with the task's token (what `flwr-clientapp --token` runs) and exits.

Each message still gets a process of its own, so a crash or a leak in one cannot reach the next.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from types import FrameType

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fedsim.runtime.deploy.polling import patch_clientapp_pull

log = logging.getLogger(__name__)

# What `clients.app` imports that costs time (docs/results/deploy-overhead.md): paid once here.
WARM_IMPORTS = (
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "datasets",
    "flwr_datasets.partitioner",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "safetensors.torch",
    "tokenizers",
)


def warm_up(modules: tuple[str, ...] = WARM_IMPORTS) -> float:
    """Import `modules`, and wrap a one-layer Llama in PEFT's LoRA once, so that what transformers and
    PEFT fill on first use (lazy imports, compiled patterns) is there before each fork; the seconds
    it took."""
    start = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    return time.perf_counter() - start


APP_PACKAGES = ("fedsim", "clients", "strategies", "dashboards")  # what a fedsim app bundle holds


def forget_app_modules() -> None:
    """Drop the app's packages from `sys.modules` (this runner is part of `fedsim`, so `fedsim` is
    imported here), so that the ClientApp imports all of them from its run's app bundle."""
    for name in [m for m in sys.modules if m.partition(".")[0] in APP_PACKAGES]:
        del sys.modules[name]


def run_task(runtime_api_address: str, token: str) -> None:
    """In a forked child: Flower's ClientApp run for one task, then exit with its code."""
    code = 1
    try:
        forget_app_modules()
        patch_clientapp_pull()
        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=True,  # the SuperNode's Runtime API listens on 127.0.0.1 only
            certificates=None,
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as done:  # run_clientapp ends with flwr_exit
        code = done.code if isinstance(done.code, int) else 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not the parent's exit handlers


def _reap(children: dict[int, tuple[int, float]]) -> None:
    """Collect the ClientApp processes that ended, logging each one's task, time and exit code."""
    for pid, (task, start) in list(children.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            del children[pid]
            log.info(
                "task %d: ClientApp process %d done in %.2f s, exit %d",
                task, pid, time.monotonic() - start, os.waitstatus_to_exitcode(status),
            )  # fmt: skip


def serve(runtime_api_address: str, poll_s: float = 0.1) -> None:
    """Run ClientApp tasks of the SuperNode at `runtime_api_address` until SIGTERM or SIGINT."""
    log.info("warm ClientApp runner: imports took %.1f s", warm_up())
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    children: dict[int, tuple[int, float]] = {}  # pid → (task id, time.monotonic() at its start)
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
    try:
        while not stopping:
            _reap(children)
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    run_task(runtime_api_address, res.token)
                children[pid] = (res.task.task_id, time.monotonic())
                continue
            time.sleep(poll_s)
    finally:
        client.close()
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    serve(sys.argv[1])
