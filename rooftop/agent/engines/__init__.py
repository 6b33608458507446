"""Engine telemetry on the agent side: the hook socket, /metrics scrapers, a client probe.

``receiver`` turns :mod:`rooftop.agent.hooks` summaries into ``EngineSample``s; ``scrape``
polls vLLM, SGLang and TGI ``/metrics``; ``probe`` measures TTFT and TPOT from the
client side of any OpenAI-compatible streaming endpoint.
"""
