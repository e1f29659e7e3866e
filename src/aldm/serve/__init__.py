"""`aldm serve`: a warm translation service (FastAPI + uvicorn + prometheus-client; extra `serve`).

One worker owns the pipeline and runs jobs one at a time; jobs and results live in the results
folder (`aldm.serve.jobs`), so they outlive the process. `aldm.serve.app` is the HTTP API,
`aldm.serve.service` the model, worker and metrics.
"""
