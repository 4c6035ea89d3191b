"""shardserve <command>: serve | router | worker | generate | chat | bench | random-model | plan | deploy.

Errors we raise on purpose print as one line and exit 2; no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shardserve.errors import InvalidRequestError, ShardserveError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace):
    from shardserve.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          seed=args.sampling_seed, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=args.stop,
                          ignore_eos=args.ignore_eos)


def _make_engine(args: argparse.Namespace):
    from shardserve.engine.llm_engine import LLMEngine
    from shardserve.engine_args import engine_config_from_args
    return LLMEngine(engine_config_from_args(args))


def cmd_generate(args: argparse.Namespace) -> int:
    from shardserve.tokenizer import apply_chat_template
    params = _sampling_params(args)  # check the flags before loading anything
    engine = _make_engine(args)
    if args.raw:
        prompt = args.prompt
    else:
        ids = apply_chat_template(engine.tokenizer, [{"role": "user", "content": args.prompt}])
        prompt = {"prompt_token_ids": ids}
    _stream(engine, prompt, params)
    return 0


def _stream(engine, prompt, params) -> str:
    engine.add_request(prompt, params)
    text = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta = out.outputs[0].delta_text
            if delta:
                text.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


def cmd_chat(args: argparse.Namespace) -> int:
    from shardserve.tokenizer import apply_chat_template
    params = _sampling_params(args)
    engine = _make_engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = apply_chat_template(engine.tokenizer, messages)
        reply = _stream(engine, {"prompt_token_ids": ids}, params)
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_random_model(args: argparse.Namespace) -> int:
    from shardserve.testing import write_model_from_args
    print(write_model_from_args(args, args.random_model_parser))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _take_positional_model(args)
    if args.headless and not _headless_node(args):
        raise InvalidRequestError("--headless is for nodes 1.. of a multi-node world: pass "
                                  "--node-rank 1 or above (or run `shardserve worker`); node 0 "
                                  "always runs the server.", "headless")
    if _headless_node(args):  # nodes 1.. of a multi-node world run ranks, not the server
        return cmd_worker(args)
    if str(args.data_parallel_size) != "1":  # N replica servers behind a router
        from shardserve.router.data_parallel import run_data_parallel
        return run_data_parallel(args, args.argv)
    from shardserve.server.app import run_server
    return run_server(args)


def _take_positional_model(args: argparse.Namespace) -> None:
    """`shardserve serve MODEL`, as `vllm serve MODEL`: the same as --model MODEL."""
    tag = getattr(args, "model_tag", None)
    if tag is None:
        return
    if args.model is not None and args.model != tag:
        raise InvalidRequestError(f"The model is given twice, as {tag!r} and --model "
                                  f"{args.model!r}; pass one of them.", "model")
    args.model = tag


def _headless_node(args: argparse.Namespace) -> bool:
    node_rank = args.node_rank if args.node_rank is not None else int(
        os.environ.get("LWS_WORKER_INDEX") or 0)
    return node_rank > 0


def cmd_worker(args: argparse.Namespace) -> int:
    from shardserve.engine_args import engine_config_from_args
    from shardserve.executor.headless import run_headless
    return run_headless(engine_config_from_args(args))


def cmd_router(args: argparse.Namespace) -> int:
    from shardserve.router.app import run_router
    return run_router(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from shardserve.bench.serve import run_bench_serve
    return run_bench_serve(args)


def build_parser() -> argparse.ArgumentParser:
    from shardserve.cli_hints import add_vllm_only_args
    from shardserve.engine_args import add_engine_args

    parser = argparse.ArgumentParser(prog="shardserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                         "/v1/chat/completions, /metrics, /health)",
                           epilog="vllm serve command lines work as they are: vLLM flags that "
                                  "ask for what shardserve does anyway are accepted, tuning "
                                  "knobs it lacks are ignored with a warning, and any that would "
                                  "change results are refused saying why.")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="the model, as in `vllm serve MODEL` (the same as --model MODEL)")
    from shardserve.server.args import add_server_args
    add_server_args(serve)
    add_engine_args(serve)
    from shardserve.router.app import add_router_args
    add_router_args(serve, standalone=False)  # --router-*: used with -dp N
    serve.add_argument("--config", default=None, metavar="YAML",
                       help="read flags from a YAML file (max-model-len: 4096), as vllm serve "
                            "--config; flags on the command line win")
    serve.add_argument("--headless", action="store_true",
                       help="as vLLM's multi-node lines have it: this node runs its ranks, not "
                            "the server (only with --node-rank 1 or above)")
    add_vllm_only_args(serve, server=True)
    serve.set_defaults(func=cmd_serve)

    router = sub.add_parser("router", help="one OpenAI endpoint over several replicas: "
                                           "load/prefix-aware balancing, health, failover")
    add_router_args(router)
    router.set_defaults(func=cmd_router)

    worker = sub.add_parser("worker", help="run this node's ranks of a multi-node world "
                                           "(node 1..; node 0 runs serve): --nnodes N "
                                           "--node-rank R --master-addr HOST [--master-port P]")
    add_engine_args(worker)
    add_vllm_only_args(worker, server=False)
    worker.set_defaults(func=cmd_worker)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from shardserve.bench.serve import add_bench_serve_args
    bench_serve = bench_sub.add_parser("serve", help="load-test a running server over HTTP")
    add_bench_serve_args(bench_serve)
    bench_serve.set_defaults(func=cmd_bench_serve)
    from shardserve.bench.offline import add_offline_bench_parsers
    add_offline_bench_parsers(bench_sub)

    gen = sub.add_parser("generate", help="complete one prompt and print the result")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, not as a chat message")
    add_engine_args(gen)
    add_vllm_only_args(gen, server=False)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streamed")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_vllm_only_args(chat, server=False)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    from shardserve.testing import add_model_writer_args
    rnd = sub.add_parser("random-model", help="write a random-weight Hugging Face model folder")
    add_model_writer_args(rnd)
    rnd.set_defaults(func=cmd_random_model, random_model_parser=rnd)

    from shardserve.deploy.cli import add_deploy_parser
    from shardserve.planner.cli import add_plan_parser
    add_plan_parser(sub)  # shardserve plan
    add_deploy_parser(sub)  # shardserve deploy k8s
    # Also after the command (`shardserve serve --log-level info`), where users put it; the
    # top-level value stays the default.
    for command in sub.choices.values():
        command.add_argument("--log-level", default=argparse.SUPPRESS,
                             help="logging level (DEBUG, INFO, WARNING, ...)")
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser in its own namespace, so an unknown flag is reported with
    that command's usage instead of the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _remember_parsers(command)


def main(argv: list[str] | None = None) -> int:
    from shardserve.cli_config import dash_flag_names, expand_config_file, pin_optional_switches
    parser = build_parser()
    argv = pin_optional_switches(dash_flag_names(list(sys.argv[1:] if argv is None else argv)),
                                 parser)
    args, extra = parser.parse_known_args(argv)
    command_parser = getattr(args, "command_parser", parser)
    if getattr(args, "config", None) is not None:  # serve --config FILE.yaml, as vLLM's
        try:
            argv, config_model = expand_config_file(argv, args.command, command_parser)
        except InvalidRequestError as err:
            command_parser.error(str(err))
        args, extra = parser.parse_known_args(argv)
        if config_model is not None and args.model is None and args.model_tag is None:
            args.model = config_model
            argv = argv + ["--model", config_model]  # for serve -dp's replicas
    if extra:
        from shardserve.cli_hints import unknown_args_message
        command_parser.error(unknown_args_message(extra, command_parser))
    from shardserve.cli_hints import check_vllm_only_args
    try:
        ignored = check_vllm_only_args(args)
    except InvalidRequestError as err:
        command_parser.error(str(err))
    args.argv = argv  # serve -dp re-runs it per replica
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for warning in ignored:
        logging.getLogger("shardserve.cli").warning("%s", warning)
    try:
        return args.func(args)
    except ShardserveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shardserve plan ... | head`: the reader left; say nothing more, not a traceback
        # (stdout is pointed at devnull so the interpreter's final flush fails quietly too).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
