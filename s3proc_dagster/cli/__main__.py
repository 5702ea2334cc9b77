import sys

from s3proc_dagster.cli.commands import main

sys.exit(main())
