from kerasnuc.cli import main

main()
