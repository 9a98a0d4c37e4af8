"""The one exception for mistakes a user can fix: the stage scripts print its message as one line and exit 2."""


class UserError(Exception):
    pass
