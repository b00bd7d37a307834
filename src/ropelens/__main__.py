"""``python -m ropelens``: the command every rule runs. A cell command goes to the workflow's warm
runner when ``ROPELENS_RUNNER`` names one (ropelens.runner_client, before torch is imported);
otherwise, or when the runner says so, it runs here, cold."""

import sys

from ropelens import runner_client

code = runner_client.run(sys.argv[1:])
if code is None:
    from ropelens.cli import main

    code = main()
raise SystemExit(code)
