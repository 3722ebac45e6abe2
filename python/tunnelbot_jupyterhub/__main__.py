"""``python -m tunnelbot_jupyterhub``: print the path of the packaged ``tunnelbot-job``."""

from .wrapper import job_wrapper_path

print(job_wrapper_path())
