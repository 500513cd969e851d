from resolver.main import main

main()
