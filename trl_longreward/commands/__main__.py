"""`python -m trl_longreward.commands COMMAND ...`: the same as the `trl-longreward` script."""

from . import main

raise SystemExit(main())
