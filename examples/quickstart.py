"""The dstack documentation's Python API quickstart: run `echo hello` and print its logs.

Run with: python examples/quickstart.py
"""

from dstack.api import Task, GPU, Client, Resources

client = Client.from_config()
task = Task(name="my-run", commands=["echo hello"], resources=Resources(gpu=GPU(count=0)))
run = client.runs.apply_configuration(configuration=task, repo=None)
run.attach()
for log in run.logs():
    print(log)
run.detach()
