package main

import (
	"fmt"
	"image/color"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// methodColors keeps a method's color the same in every plot.
var methodColors = map[string]color.RGBA{
	methodFloor:       {0x55, 0x55, 0x55, 0xff},
	methodCold:        {0xd6, 0x27, 0x28, 0xff},
	methodPageServer:  {0xff, 0x7f, 0x0e, 0xff},
	methodStopcopy:    {0x1f, 0x77, 0xb4, 0xff},
	methodPrecopy:     {0x2c, 0xa0, 0x2c, 0xff},
	methodPrecopyZstd: {0x94, 0x67, 0xbd, 0xff},
}

// writePlots draws, per link, downtime and total time against memory size
// for the memhog cases with a 16 MiB incompressible hot set, and returns the
// file names written.
func writePlots(dir string, ss []summary) ([]string, error) {
	var files []string
	for _, link := range []string{linkUnshaped, link1Gbit} {
		for _, fig := range []struct {
			name, title string
			value       func(summary) float64
		}{
			{"downtime", "downtime seen by the workload", func(s summary) float64 { return s.Seen / 1000 }},
			{"total", "total migration time", func(s summary) float64 { return s.Total / 1000 }},
		} {
			lines := map[string]plotter.XYs{}
			own := false
			for _, s := range ss {
				w := s.Workload
				if s.OK == 0 || w.Kind != "memhog" || w.HotMiB != 16 || w.Compressible {
					continue
				}
				if s.Link != link && !(s.Method == methodFloor && s.Link == linkUnshaped) {
					continue
				}
				lines[s.Method] = append(lines[s.Method], plotter.XY{X: float64(w.MemMiB), Y: fig.value(s)})
				own = own || s.Link == link
			}
			if !own {
				continue
			}
			p := plot.New()
			p.Title.Text = fmt.Sprintf("%s, link %s (memhog, 16 MiB hot)", fig.title, link)
			p.X.Label.Text = "memory (MiB)"
			p.Y.Label.Text = "seconds"
			p.Y.Min = 0
			p.Add(plotter.NewGrid())
			p.Legend.Top = true
			p.Legend.Left = true
			for _, m := range methodOrder {
				xys, ok := lines[m]
				if !ok {
					continue
				}
				slices.SortFunc(xys, func(a, b plotter.XY) int {
					switch {
					case a.X < b.X:
						return -1
					case a.X > b.X:
						return 1
					}
					return 0
				})
				l, pts, err := plotter.NewLinePoints(xys)
				if err != nil {
					return nil, err
				}
				c := methodColors[m]
				l.Color, pts.Color = c, c
				l.Width = vg.Points(1.5)
				pts.Shape = draw.CircleGlyph{}
				p.Add(l, pts)
				p.Legend.Add(m, l, pts)
			}
			name := fmt.Sprintf("%s-%s.png", fig.name, link)
			if err := p.Save(7*vg.Inch, 4.5*vg.Inch, filepath.Join(dir, name)); err != nil {
				return nil, err
			}
			files = append(files, name)
		}
	}
	return files, nil
}
