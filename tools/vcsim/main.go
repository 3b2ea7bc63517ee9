// Command vcsim serves govmomi's vSphere API simulator for imagefs's tests.
//
// Debian packages govmomi's simulator library (golang-github-vmware-govmomi-dev) but not
// its vcsim command; this small main of our own fills the gap. Flags follow upstream's
// names where they exist; -dsdir is ours: the parent directory of the simulated
// datastores (they are removed again on SIGTERM/SIGINT).
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:8989", "listen address (port 0: any free port)")
	useTLS := flag.Bool("tls", true, "serve https")
	certFile := flag.String("tlscert", "", "TLS certificate (PEM); default: a built-in test certificate")
	keyFile := flag.String("tlskey", "", "TLS private key (PEM)")
	username := flag.String("username", "", "login user (empty: any user and password)")
	password := flag.String("password", "", "login password")
	envFile := flag.String("E", "", "write the server URL and pid here as shell exports")
	dsDir := flag.String("dsdir", "", "parent directory of the datastores' directories")
	esx := flag.Bool("esx", false, "simulate a standalone ESXi host instead of vCenter")
	model := simulator.VPX()
	flag.IntVar(&model.Datacenter, "dc", model.Datacenter, "datacenters")
	flag.IntVar(&model.Cluster, "cluster", model.Cluster, "clusters per datacenter")
	flag.IntVar(&model.ClusterHost, "host", model.ClusterHost, "hosts per cluster")
	flag.IntVar(&model.Host, "standalone-host", model.Host, "standalone hosts per datacenter")
	flag.IntVar(&model.Datastore, "ds", model.Datastore, "datastores")
	flag.IntVar(&model.Machine, "vm", model.Machine, "virtual machines per resource pool")
	flag.Parse()

	if *esx {
		esxModel := simulator.ESX()
		esxModel.Datastore, esxModel.Machine = model.Datastore, model.Machine
		model = esxModel
	}
	if *dsDir != "" {
		// the model makes its datastores with ioutil.TempDir("", ...)
		if err := os.Setenv("TMPDIR", *dsDir); err != nil {
			log.Fatal(err)
		}
	}
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	if *useTLS {
		model.Service.TLS = new(tls.Config)
		if *certFile != "" {
			cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
			if err != nil {
				log.Fatal(err)
			}
			model.Service.TLS.Certificates = []tls.Certificate{cert}
		}
	}
	server := model.Service.NewServer()
	defer server.Close()

	if err := writeEnv(*envFile, server.URL.String()); err != nil {
		log.Fatal(err)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}

// writeEnv tells the starter where the server listens: written to a temporary name and
// renamed, so a reader never sees half a line.
func writeEnv(path, serverURL string) error {
	line := fmt.Sprintf("export GOVC_URL=%s GOVC_SIM_PID=%d\n", serverURL, os.Getpid())
	if path == "" {
		_, err := io.WriteString(os.Stdout, line)
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(line), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
