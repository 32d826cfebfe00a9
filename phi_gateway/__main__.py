from phi_gateway.cli import main

main()
