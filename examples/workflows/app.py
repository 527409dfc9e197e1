"""The `app` workflow: a FastAPI application served by uvicorn behind the server's proxy."""
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def index():
    return {"app": "workflows example"}
