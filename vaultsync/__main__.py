from vaultsync.commands.cli import main

main()
